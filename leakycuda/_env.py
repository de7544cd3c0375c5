"""Where a run happened: machine, versions, GPU and driver, and the git commit of the source tree (for result JSON)."""
import os
import platform
import subprocess

import torch


#: Names the commit measured where git cannot tell (an installed copy, a source tree copied without .git).
COMMIT_ENV = "LEAKYCUDA_COMMIT"


def git_commit():
    """$LEAKYCUDA_COMMIT when set, else the commit of the checkout this package runs from (with -dirty for
    uncommitted changes), or None."""
    if os.environ.get(COMMIT_ENV, "").strip():
        return os.environ[COMMIT_ENV].strip()
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_info(device="cpu"):
    """Where a measurement came from: machine, versions and the git commit measured."""
    info = {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "git_commit": git_commit(),
        "device": str(device),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_sms"] = props.multi_processor_count
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            info["driver"] = None
    return info
