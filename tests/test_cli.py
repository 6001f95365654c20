"""cli.py: the checked flag types, the device's precision, and run_main's one sentence and exit
status. (Each message as a user meets it, through the scripts, is in test_bad_input.py.)"""
import argparse

import pytest
import torch

import cli


@pytest.mark.parametrize("parse, text, value", [
    (cli.positive_int, "3", 3), (cli.positive_float, "1e-3", 1e-3), (cli.steps_or_0, "0", 0),
    (cli.fraction, "0.05", 0.05)])
def test_a_checked_type_converts_a_good_value(parse, text, value):
    assert parse(text) == value


@pytest.mark.parametrize("parse, text, rule", [
    (cli.positive_int, "0", "a positive whole number"), (cli.positive_int, "1.5", "a positive whole number"),
    (cli.positive_float, "-2", "a positive number"), (cli.steps_or_0, "-1", "zero or a positive whole number"),
    (cli.fraction, "1", "a number between 0 and 1"), (cli.fraction, "half", "a number between 0 and 1")])
def test_a_checked_type_names_the_rule_a_bad_value_broke(parse, text, rule):
    with pytest.raises(argparse.ArgumentTypeError, match=f"^must be {rule}, got '{text}'$"):
        parse(text)


@pytest.mark.parametrize("raised, status, said", [
    (None, 0, ""), (cli.UserError("the folder x does not exist; pass --data"), 2,
                    "error: the folder x does not exist; pass --data\n"),
    (KeyboardInterrupt(), 130, "\ninterrupted; every file written so far is whole\n")])
def test_run_main_ends_in_one_sentence_and_its_exit_status(capsys, raised, status, said):
    def main():
        if raised is not None:
            raise raised
        return 0
    with pytest.raises(SystemExit) as exit_:
        cli.run_main(main)
    assert exit_.value.code == status and capsys.readouterr().err == said


@pytest.mark.parametrize("amx, avx512_bf16, fast", [(True, False, True), (False, True, True), (False, False, False)])
def test_auto_amp_turns_bf16_on_for_a_cpu_with_bf16_instructions(monkeypatch, amx, avx512_bf16, fast):
    """AMX (Intel Xeon) or AVX-512 BF16 (AMD Zen 4) run bf16 natively; other CPUs would emulate it."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert cli.bf16_is_fast(torch.device("cpu")) == fast
    assert not cli.bf16_is_fast(torch.device("meta"))  # neither a CPU nor a CUDA GPU


@pytest.mark.parametrize("capability, fast", [((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True)])
def test_auto_amp_turns_bf16_on_only_for_a_gpu_that_has_it_natively(monkeypatch, capability, fast):
    """A Tesla T4 (7.5) or V100 (7.0) says torch.cuda.is_bf16_supported() but emulates bfloat16;
    an A100 (8.0) or H100 (9.0) runs it natively."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert cli.bf16_is_fast(torch.device("cuda")) == fast
