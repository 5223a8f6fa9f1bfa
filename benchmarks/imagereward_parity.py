"""ImageReward parity: this port (transformers 5 BLIP classes) against the reference package.

Builds one random ImageReward checkpoint in the official layout with
``automerge.testing.write_random_imagereward`` (full ViT-L/16 vision tower, as the reference
hard-codes it; a 2-layer BERT text encoder of width 768, as the reference's 768-wide head needs),
scores the same PNGs and prompts with the reference ``image-reward`` package (run in its own virtual
environment under transformers 4.55) and with ``automerge.rewards``, and prints the largest absolute
difference. Without ``--reference-venv`` it prints how to create that environment.

    python benchmarks/imagereward_parity.py --reference-venv /tmp/imagereward-ref
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HOW_TO = """\
The reference needs its own virtual environment (it does not import under transformers >= 4.56):

    python3.11 -m venv /tmp/imagereward-ref
    /tmp/imagereward-ref/bin/pip install "image-reward==1.5" "transformers==4.55.*" torch torchvision openai-clip
    python benchmarks/imagereward_parity.py --reference-venv /tmp/imagereward-ref
"""

# Runs inside the reference environment. BLIP's init_tokenizer downloads bert-base-uncased: it is
# replaced by the same tokenizer built from the local vocab.txt (BertTokenizer(vocab_file=) is
# correct under transformers 4.x).
REFERENCE = """\
import json, sys, torch
args = json.loads(sys.argv[1])
from transformers import BertTokenizer
import ImageReward.models.BLIP.blip_pretrain as blip_pretrain
def init_tokenizer():
    tokenizer = BertTokenizer(vocab_file=args["vocab"])
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
    return tokenizer
blip_pretrain.init_tokenizer = init_tokenizer
from ImageReward.ImageReward import ImageReward
model = ImageReward(med_config=args["med_config"], device="cpu").eval()
result = model.load_state_dict(torch.load(args["checkpoint"], map_location="cpu"), strict=False)
assert not result.missing_keys and not result.unexpected_keys, result
with torch.no_grad():
    print(json.dumps([model.score(p, i) for p, i in zip(args["prompts"], args["images"])]))
"""

PROMPTS = ["a photo of a cat", "a red house in the tree", "the blue dog on a house"]


def _write_inputs(folder: Path, *, seed: int) -> dict[str, object]:
    """Checkpoint, med_config, vocab, manifest and PNGs of differing sizes; returns the child's args."""
    from automerge.testing import BertSizes, tiny_image, write_random_imagereward

    # The official ViT-L/16 at 224 px (the default); a 2-layer BERT of width 768, the tiny vocabulary.
    text = BertSizes(hidden_size=768, layers=2, heads=4, intermediate_size=1536, max_positions=40)
    write_random_imagereward(folder, text=text, seed=seed)
    images = []
    for index, size in enumerate([(256, 256), (300, 227), (227, 400)]):
        path = folder / f"image{index}.png"
        tiny_image(seed + index, size=size).save(path)
        images.append(str(path))
    return {
        "checkpoint": str(folder / "ImageReward.pt"),
        "med_config": str(folder / "med_config.json"),
        "vocab": str(folder / "vocab.txt"),
        "images": images,
        "prompts": PROMPTS,
    }


def _port_scores(folder: Path, args: dict[str, object]) -> list[float]:
    from PIL import Image

    from automerge.rewards import load_reward

    images = [Image.open(path).convert("RGB") for path in args["images"]]  # type: ignore[union-attr]
    return list(load_reward(folder / "imagereward.yaml").score(images, PROMPTS).scores)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-venv", type=Path, help="virtual environment with image-reward 1.5")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    python = options.reference_venv / "bin" / "python" if options.reference_venv else None
    if python is None or not python.exists():
        print(HOW_TO, end="")
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        args = _write_inputs(folder, seed=options.seed)
        run = subprocess.run(
            [str(python), "-c", REFERENCE, json.dumps(args)], capture_output=True, text=True, check=False
        )
        if run.returncode != 0:
            print(f"the reference failed:\n{run.stderr}", file=sys.stderr)
            return 1
        reference = json.loads(run.stdout.strip().splitlines()[-1])
        port = _port_scores(folder, args)
    for prompt, ref, ours in zip(PROMPTS, reference, port, strict=True):
        print(f"{prompt!r:32} reference {ref:+.9f}  port {ours:+.9f}  diff {abs(ref - ours):.3e}")
    print(f"largest absolute difference: {max(abs(r - p) for r, p in zip(reference, port, strict=True)):.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
