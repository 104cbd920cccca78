"""What the end-to-end tests of one tiny training run share: the smoke config and settings that
make a run take seconds, its command line, the one-line error check and a folder snapshot.
(Imported by name: pytest puts this folder on sys.path, as the tests folders are not packages.)"""
from pathlib import Path

from fastprompt.cli import main

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "smoke.yaml")


def tiny_settings(epochs: int = 1) -> list[str]:
    """Overrides for a seconds-long run: the random tiny CLIP, 2 shots, one seed, fp32 on the CPU."""
    return ["model.name=fastprompt-tiny", "model.pretrained=null", "data.dataset=imagefolder", "data.seeds=[1]",
            "data.shots=2", f"train.epochs={epochs}", "train.batch_size=4", "train.precision=fp32",
            "train.device=cpu", "train.num_workers=0", "train.progress=false"]


TINY = tiny_settings()


def train_argv(digits_root, out, *extra, settings=TINY) -> list[str]:
    """`fastprompt train` of the smoke config on the digits into `out`."""
    return ["train", CONFIG, *settings, f"data.root={digits_root}", f"output_dir={out}", *extra]


def cli_error(capsys, argv) -> str:
    """Run the CLI in-process; it must fail with one line (exit 2, no traceback): that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastprompt {argv[0]}: error: ") and "Traceback" not in err
    return err


def snapshot(folder: Path) -> dict:
    """Every file below `folder` with its bytes (to show that nothing was changed)."""
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
