"""Shared helpers for the pipeline tests (tiny synthetic data, the training script run in-process)."""
import importlib.util
import os
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
TINY_CONFIG = os.path.join(TESTS, "configs", "tiny_synthetic.py")
# one fixed cache folder for the tiny synthetic data of every test (it is deterministic)
SYNTH_ROOT = os.path.join(tempfile.gettempdir(), "codetr_test_synthetic")
os.environ.setdefault("CODETR_SYNTHETIC_ROOT", SYNTH_ROOT)


def load_train_script():
    spec = importlib.util.spec_from_file_location("codetr_train_net", os.path.join(ROOT, "tools", "lazyconfig_train_net.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.join(ROOT, "projects", "CoDETR"), TESTS] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env["OMP_NUM_THREADS"] = "1"
    return env
