"""The driver's training progress lines (pipelines.train_progress): formatting, and following a metrics file that
grows line by line, half-written lines included, from where it ended when the run started."""
import io
import json

from pipelines.train_progress import ProgressPrinter, format_record


def test_format_train_val_setup_lines():
    train = {"step": 7, "kind": "train", "attempt": 0, "loss": 3.14159, "lr": 3e-4, "grad_norm": 1.234,
             "tokens_per_s": 12345.6, "lambda_mean": 0.0123}
    assert format_record(train, 120) == ("train step   7/120  loss 3.1416  lr 3.00e-04  grad_norm 1.234  "
                                         "12,346 tok/s  λ 0.0123")
    head = {**train, "omega_s": 0.25, "gate_open": 0.5}  # the SM head's state, logged every step
    assert format_record(head, 120).endswith("12,346 tok/s  ω_s 0.25  λ 0.0123  gate-open 0.500")
    assert format_record({"step": 120, "kind": "val", "val_ppl": 54.321, "val_ppl_two_pass": 50.0}, 120) == \
        "val   step 120/120  val_ppl 54.32  val_ppl_two_pass 50.00"
    assert format_record({"step": 0, "kind": "setup", "attempt": 0, "world": 2.0, "setup_s": 9.26}, 20) == \
        "train started at step 0: 2 workers, set up in 9.3 s"
    assert format_record({"step": 8, "kind": "setup", "attempt": 2, "world": 4.0, "setup_s": 1.0}, 20) == \
        "train restored (attempt 2) at step 8: 4 workers, set up in 1.0 s"
    assert format_record({"step": 1, "kind": "other"}, 20) is None


def test_follows_new_complete_lines_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    old = {"step": 3, "kind": "train", "loss": 9.0}
    path.write_text(json.dumps(old) + "\n")  # a resumed run: what was there before is not printed again
    out = io.StringIO()
    printer = ProgressPrinter(str(path), 6, out=out, interval_s=0.05)
    assert printer.poll() == 0 and out.getvalue() == ""
    line5 = json.dumps({"step": 5, "kind": "train", "loss": 2.0}) + "\n"
    with open(path, "a") as f:
        f.write(json.dumps({"step": 4, "kind": "train", "loss": 2.5}) + "\n" + line5[:12])  # step 5 half-written
    assert printer.poll() == 1
    assert out.getvalue() == "train step 4/6  loss 2.5000\n"
    with open(path, "a") as f:
        f.write(line5[12:] + "not json\n" + json.dumps({"step": 6, "kind": "val", "val_ppl": 7.0}) + "\n")
    with printer:  # the thread and the final poll at exit
        pass
    assert out.getvalue().splitlines()[1:] == ["train step 5/6  loss 2.0000", "val   step 6/6  val_ppl 7.00"]
    assert printer.printed == 3


def test_missing_file_prints_nothing_until_it_appears(tmp_path):
    path = tmp_path / "out" / "metrics.jsonl"
    out = io.StringIO()
    with ProgressPrinter(str(path), 2, out=out, interval_s=0.05) as printer:
        assert printer.poll() == 0
        path.parent.mkdir()
        path.write_text(json.dumps({"step": 1, "kind": "train", "loss": 1.0}) + "\n")
    assert out.getvalue() == "train step 1/2  loss 1.0000\n"


def test_follows_an_s3_object_rewritten_by_another_client(s3_server):
    """What rank 0 does with an S3 output directory: upload the whole metrics file again at each checkpoint."""
    import s3fs

    from infra.storage import filesystem

    s3_server.create_bucket("progress-test")
    uri = "s3://progress-test/run/output/metrics.jsonl"
    fs, path = filesystem(uri)
    writer = s3fs.S3FileSystem(**fs.storage_options, skip_instance_cache=True)
    lines = [json.dumps({"step": k, "kind": "train", "loss": 1.0 / k}) + "\n" for k in (1, 2, 3)]
    writer.pipe_file(path, lines[0].encode())
    out = io.StringIO()
    printer = ProgressPrinter(uri, 3, out=out, remote_interval_s=0.05)
    assert printer.poll() == 0  # there before the run started
    writer.pipe_file(path, "".join(lines[:2]).encode())
    assert printer.poll() == 1
    writer.pipe_file(path, "".join(lines).encode())
    assert printer.poll() == 1
    assert out.getvalue().splitlines() == ["train step 2/3  loss 0.5000", "train step 3/3  loss 0.3333"]
