"""The optimization loop: study files, search space, samplers, early stopping, the per-trial
objective, resume and storage. The only package that imports optuna (with report/)."""
