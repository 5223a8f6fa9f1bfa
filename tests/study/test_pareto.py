"""The Pareto front's math, pinned by hand: which points are on it, its hypervolume, and the rules
that pick one of its points (issue 18)."""

from __future__ import annotations

import numpy as np
import pytest

from automerge.errors import ConfigError
from automerge.study.pareto import (
    KNEE,
    PickRule,
    Scale,
    dominates,
    front_mask,
    hypervolume,
    hypervolume_trace,
    maximized,
    parse_pick,
    pick,
    range_scale,
)


def test_the_front_keeps_the_points_no_other_dominates_and_both_of_a_tie() -> None:
    points = np.array([[1.0, 5.0], [3.0, 3.0], [2.0, 2.0], [5.0, 1.0], [3.0, 3.0], [0.0, 5.0]])
    assert front_mask(points).tolist() == [True, True, False, True, True, False]


def test_a_point_dominates_only_when_at_least_as_good_everywhere_and_better_somewhere() -> None:
    p = np.array([2.0, 3.0])
    assert dominates(p, np.array([2.0, 2.0])) and dominates(p, np.array([1.0, 1.0]))
    assert not dominates(p, p.copy())  # a tie is not domination
    assert not dominates(p, np.array([3.0, 1.0])) and not dominates(np.array([2.0, 2.0]), p)


def test_a_minimized_objective_is_negated_before_the_front_is_taken() -> None:
    scores = np.array([[1.0, 10.0], [2.0, 20.0], [2.0, 5.0]])  # maximize the first, minimize the second
    assert maximized(scores, [True, False]).tolist() == [[1.0, -10.0], [2.0, -20.0], [2.0, -5.0]]
    assert front_mask(maximized(scores, [True, False])).tolist() == [False, False, True]


def test_the_hypervolume_of_two_boxes_is_their_union_and_points_short_of_the_reference_add_nothing() -> None:
    reference = np.zeros(2)
    assert hypervolume(np.array([[1.0, 2.0], [2.0, 1.0]]), reference) == pytest.approx(3.0)  # 2 + 2 − 1
    assert hypervolume(
        np.array([[1.0, 2.0], [2.0, 1.0], [3.0, -1.0], [0.0, 9.0]]), reference
    ) == pytest.approx(3.0)
    assert hypervolume(np.empty((0, 2)), reference) == 0.0
    assert hypervolume(np.array([[1.0, 1.0, 2.0]]), np.zeros(3)) == pytest.approx(2.0)


def test_the_hypervolume_trace_grows_when_a_point_joins_the_front_and_holds_otherwise() -> None:
    points = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.4, 0.4], [1.0, 1.0]])
    trace = hypervolume_trace(points, Scale(np.zeros(2), np.ones(2)))
    assert trace == pytest.approx([0.0, 0.0, 0.25, 0.25, 1.0])
    doubled = hypervolume_trace(points * [2.0, 10.0], range_scale(points[:3] * [2.0, 10.0]))
    assert doubled == pytest.approx(trace)  # normalised: the units do not count


def test_the_knee_is_the_front_point_nearest_the_ideal_point_whatever_the_units() -> None:
    front = np.array([[0.0, 10.0], [4.0, 6.0], [10.0, 0.0]])  # normalised: (0, 1), (0.4, 0.6), (1, 0)
    row, why = pick(front, KNEE)
    assert row == 1 and "knee" in why and "0.721" in why  # √(0.6² + 0.4²)
    assert pick(front * [1.0, 1000.0], KNEE)[0] == 1
    assert pick(front[:1], KNEE)[0] == 0  # a front of one point


def test_the_weighted_rule_maximises_the_weighted_sum_of_the_normalised_objectives() -> None:
    front = np.array([[0.0, 10.0], [4.0, 7.0], [10.0, 0.0]])  # normalised: (0, 1), (0.4, 0.7), (1, 0)
    assert pick(front, PickRule("weighted", (1.0, 0.0)))[0] == 2
    assert pick(front, PickRule("weighted", (0.0, 1.0)))[0] == 0
    assert pick(front, PickRule("weighted", (0.7, 0.3)))[0] == 2  # 0.3, 0.49, 0.7
    assert pick(front, PickRule("weighted", (0.5, 0.5)))[0] == 1  # 0.5, 0.55, 0.5
    assert pick(front, PickRule("weighted", (2.0, 2.0)))[0] == 1  # only the weights' ratio counts
    assert pick(front * [0.001, 1.0], PickRule("weighted", (0.5, 0.5)))[0] == 1  # nor the units
    row, why = pick(front, PickRule("weighted", (0.5, 0.5)))
    assert "weights 0.5, 0.5 (0.55)" in why


def test_pick_rules_parse_from_the_command_line() -> None:
    assert parse_pick("knee") == KNEE
    assert parse_pick("weighted:0.7,0.3") == PickRule("weighted", (0.7, 0.3))
    assert parse_pick("weighted:1,0,2").text == "weighted:1,0,2"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("best", "--pick best: unknown pick rule 'best'; known: knee, weighted"),
        ("kne", "(did you mean 'knee'?)"),
        ("knee:1", "--pick knee:1: knee takes no weights"),
        ("weighted", "weights are numbers separated by commas"),
        ("weighted:0.7,x", "weights are numbers separated by commas"),
        ("weighted:0,0", "not all 0"),
        ("weighted:-1,2", "one weight ≥ 0 per objective"),
        ("weighted:nan,1", "one weight ≥ 0 per objective"),
    ],
)
def test_a_bad_pick_rule_is_refused_naming_it(text: str, message: str) -> None:
    with pytest.raises(
        ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")
    ):
        parse_pick(text)
