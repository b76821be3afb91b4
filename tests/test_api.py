"""The short public API named in the README."""

import subprocess
import sys

import pytest


def test_public_names_import_and_stay_light():
    code = ("import sys, mmtune; assert 'torch' not in sys.modules; "
            "from mmtune import train, evaluate, load_config, write_report, NRCA, Spider, MethodTrainer; "
            "from mmtune.methods import NRCA as N, Spider as S, NRCAConfig; assert N is NRCA and S is Spider; "
            "print(mmtune.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().count(".") == 2


def test_version_flag(capsys):
    from mmtune import __version__
    from mmtune.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"mmtune {__version__}"


def test_unknown_public_name_is_an_attribute_error():
    import mmtune

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mmtune.nope  # noqa: B018


def test_a_usage_error_comes_before_torch_and_importing_is_quiet():
    """A mistyped command is answered without importing torch (it took 2–4 s before); `import mmtune` quietens
    bitsandbytes' import-time kernel notice for library users too, not only on the command line."""
    code = ("import sys, logging\n"
            "from mmtune.cli import main\n"
            "try:\n    main(['train'])\nexcept SystemExit as done:\n    assert done.code == 2\n"
            "assert 'torch' not in sys.modules, 'torch imported before the usage error'\n"
            "assert logging.getLogger('bitsandbytes.backends.cpu.ops').getEffectiveLevel() >= logging.ERROR\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "the following arguments are required: --config" in result.stderr
