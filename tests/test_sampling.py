"""Which distribution a stored logprob is under (DESIGN §4, "The ratio rule"): one case per rule, each refusal named."""

import pytest

from replay.core.sampling import (RAW, Distribution, UnreproducibleSampling, recompute_distribution,
                                  stored_distribution)


def test_processed_rows_are_read_against_their_own_settings():
    assert stored_distribution("processed", 0.7, 5, 0.8) == Distribution(0.7, 5, 0.8)
    assert stored_distribution("processed", 1.0, 0, 1.0) == RAW
    assert stored_distribution("processed", 0.7, -1, None) == Distribution(0.7, 0, 1.0)  # -1 / NULL: no cut


def test_raw_rows_are_read_against_the_plain_softmax_whatever_they_sampled_with():
    assert stored_distribution("raw", 0.7, 5, 0.8) == RAW


def test_unknown_rows_are_raw_only_when_they_record_no_setting():
    assert stored_distribution("unknown", None, None, None) == RAW
    assert stored_distribution("unknown", 1.0, 0, 1.0) == RAW
    for kwargs, name in [({"temperature": 0.7}, "temperature"), ({"top_k": 5}, "top_k"), ({"top_p": 0.9}, "top_p")]:
        with pytest.raises(UnreproducibleSampling, match=name) as caught:
            stored_distribution("unknown", **kwargs)
        assert caught.value.setting == name


@pytest.mark.parametrize("setting,value", [("min_p", 0.05), ("repetition_penalty", 1.1), ("presence_penalty", 0.5),
                                           ("frequency_penalty", 0.2), ("logit_bias", {"7": 3.0}),
                                           ("some_new_knob", 1)])
def test_settings_the_learner_cannot_reproduce_are_refused_by_name(setting, value):
    with pytest.raises(UnreproducibleSampling, match=f"{setting}=") as caught:
        stored_distribution("processed", 1.0, 0, 1.0, **{setting: value})
    assert caught.value.setting == setting
    # at their neutral value (or NULL) they change nothing and pass
    stored_distribution("processed", 1.0, 0, 1.0, min_p=0.0, repetition_penalty=1.0, logit_bias=None, some_new_knob=None)


@pytest.mark.parametrize("mode,temperature,name", [("processed", 0.0, "temperature"), ("processed", None, "temperature"),
                                                   ("processed_logits", 1.0, "logprobs_mode"),
                                                   ("none", 1.0, "logprobs_mode")])
def test_greedy_unrecorded_and_unknown_modes_are_refused(mode, temperature, name):
    with pytest.raises(UnreproducibleSampling, match=name):
        stored_distribution(mode, temperature, 0, 1.0)


def test_a_bad_top_p_is_refused():
    with pytest.raises(UnreproducibleSampling, match="top_p"):
        stored_distribution("processed", 1.0, 0, 1.5)


def test_recompute_uses_what_it_can_reproduce_on_both_sides():
    assert recompute_distribution(0.7, 5, 0.8) == Distribution(0.7, 5, 0.8)
    assert recompute_distribution(0.0, 5, 0.8) == RAW  # greedy: the plain softmax
    assert recompute_distribution(None, None, None) == RAW
    assert recompute_distribution(0.7, 0, 1.5) == Distribution(0.7)
