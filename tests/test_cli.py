"""The CLI's contract: help works without torch, user errors are one line and exit 2."""
import subprocess
import sys

from maskrt.cli import build_parser, main
from maskrt.errors import MaskrtError


def test_help_lists_every_verb():
    text = build_parser().format_help()
    for verb in ["data", "train", "eval", "predict", "ablate", "export", "build", "plugin", "infer", "bench", "demo"]:
        assert verb in text


def test_user_error_is_one_line_and_exit_2(capsys, monkeypatch):
    import maskrt.cli as cli

    def boom(args):
        raise MaskrtError("the thing is missing: /nope")

    monkeypatch.setattr(cli, "_demo", boom)
    parser_main = cli.main
    # rebuild so set_defaults picks up the patched handler
    assert parser_main(["demo"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "maskrt: error: the thing is missing: /nope"


def test_bad_input_size_is_rejected():
    proc = subprocess.run(
        [sys.executable, "-m", "maskrt", "export", "--weights", "w", "--input-size", "500x500", "--out", "x.onnx"],
        capture_output=True, text=True)
    assert proc.returncode == 2
    assert "multiples of 32" in proc.stderr


def test_cli_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import maskrt.cli; maskrt.cli.build_parser()"
    subprocess.run([sys.executable, "-c", code], check=True)
