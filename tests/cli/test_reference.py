"""The README's CLI reference is the commands' current help."""

from pathlib import Path

from stepquant.cli.reference import END, START, render, replace


def test_readme_cli_reference_is_up_to_date():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert START in readme and END in readme
    assert replace(readme) == readme, "run: python -m stepquant.cli.reference --write README.md"


def test_reference_lists_every_command_and_option():
    text = render()
    for cmd in ("inspect", "convert", "check", "verify", "demo", "bench", "serve"):
        assert f"#### `stepquant {cmd}`" in text
    for option in ("--gpqa-mode", "--kv-cache", "--compute-dtype", "--resume", "--to"):
        assert option in text
