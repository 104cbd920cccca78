"""One error base: every user-facing error is a FastpromptError (the CLI prints it as one line)
and still the built-in type callers caught before; anything else keeps its traceback."""
import pytest

from fastprompt import errors
from fastprompt.cli import main

LEGACY_BASES = {
    "ConfigError": ValueError,
    "DatasetError": ValueError,
    "ModelError": ValueError,
    "ClassNamesError": ValueError,
    "MissingFileError": FileNotFoundError,
    "CheckpointError": RuntimeError,
    "RunFolderError": ValueError,
    "RunFolderInUseError": ValueError,
    "WriteError": OSError,
    "ResultsError": ValueError,
    "DivergenceError": FloatingPointError,
}


def test_every_user_facing_error_has_the_base_and_its_legacy_type():
    assert sorted(LEGACY_BASES) == sorted(n for n in errors.__all__ if n != "FastpromptError")
    for name, legacy in LEGACY_BASES.items():
        cls = getattr(errors, name)
        assert issubclass(cls, errors.FastpromptError) and issubclass(cls, legacy), name


def test_the_cli_prints_user_errors_as_one_line_and_lets_bugs_raise(tmp_path, capsys, monkeypatch):
    import fastprompt.report as report

    assert main(["report", str(tmp_path / "nowhere")]) == 2  # MissingFileError: one line
    err = capsys.readouterr().err
    assert err.startswith("fastprompt report: error: no results.json") and "Traceback" not in err

    def bug(run_dirs, out=None):
        raise ValueError("a bug in fastprompt, not the user's input")

    monkeypatch.setattr(report, "write_report", bug)
    (tmp_path / "results.json").write_text('{"protocol": "base2new"}')
    with pytest.raises(ValueError, match="a bug in fastprompt"):  # the traceback reaches the user
        main(["report", str(tmp_path)])
