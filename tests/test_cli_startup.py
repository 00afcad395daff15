"""`preftune --help`, `config show` and the labeling commands took seconds to start: importing
the CLI loaded torch and matplotlib (and validating a config loaded torch for the loss names),
though none of them computes anything. Each command now imports its heavy modules when it runs."""

from __future__ import annotations

import subprocess
import sys
import textwrap

HEAVY = ("torch", "matplotlib", "transformers")


def test_the_cli_and_config_validation_load_no_torch_matplotlib_or_transformers(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  path: m\ndata:\n  train: d.jsonl\nloss:\n  type: [sigmoid, sft]\n"
                      "  weights: [1.0, 0.5]\n")
    # A fresh interpreter: this test process has long since imported torch.
    script = textwrap.dedent(f"""
        import sys
        from typer.testing import CliRunner

        import preftune.cli
        from preftune.config import load_config

        load_config({str(config)!r})
        for args in (["--help"], ["config", "show"], ["label", "--help"], ["eval", "--help"]):
            result = CliRunner().invoke(preftune.cli.app, args)
            assert result.exit_code == 0, (args, result.output)
        print(" ".join(name for name in {HEAVY!r} if name in sys.modules))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []
