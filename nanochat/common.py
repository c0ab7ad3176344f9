"""
What every script needs and nothing more: the base directory, rank-0 printing and logging, device and
process-group set-up with sums and gathers across ranks, the check that CUDA works before a GPU run spends money
(`python -m nanochat.common`), the compute dtype, the training loops' shared settings (micro-steps, compile, stop on
a signal), peak FLOPs and memory, a no-op wandb, and a safe file download.

Not a utils grab-bag: anything that belongs to one concept (tokenizer, data, model, ...) lives in that
concept's module.
"""

import ctypes
import logging
import os
import platform
import random
import resource
import signal
import sys
import time
from functools import lru_cache

import requests
import torch
import torch.distributed as dist
from filelock import FileLock

# -----------------------------------------------------------------------------
# Logging and printing


class _ColorFormatter(logging.Formatter):
    COLORS = {"DEBUG": "\033[36m", "INFO": "\033[32m", "WARNING": "\033[33m", "ERROR": "\033[31m", "CRITICAL": "\033[35m"}

    def format(self, record):
        message = super().format(record)
        color = self.COLORS.get(record.levelname, "")
        return f"{color}{message}\033[0m" if color and os.isatty(2) else message


_handler = logging.StreamHandler()
_handler.setFormatter(_ColorFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
logging.basicConfig(level=logging.INFO, handlers=[_handler])
logger = logging.getLogger("nanochat")


# -----------------------------------------------------------------------------
# User mistakes: one line, not a traceback


class UserError(ValueError):
    """A mistake the user can fix: a bad setting or value, missing data, tokenizer or checkpoint. Any script that
    imports this module prints it as one `error: ...` line and exits with status 1; real bugs (any other
    exception) keep their traceback. The message names the value seen, what is allowed and what to run."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the user must create or fetch first (data, tokenizer, checkpoint); still a FileNotFoundError."""


def _excepthook(exc_type, exc, tb):
    if issubclass(exc_type, UserError):
        print(f"error: {exc}", file=sys.stderr)
    else:
        sys.__excepthook__(exc_type, exc, tb)


sys.excepthook = _excepthook


def print0(*args, **kwargs):
    """print() on rank 0 only, so multi-process runs log one line per event."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)


def get_base_dir():
    """All artifacts (data, tokenizer, checkpoints, report) live here."""
    base_dir = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base_dir, exist_ok=True)
    return base_dir


# -----------------------------------------------------------------------------
# Devices, processes and precision


def get_dist_info():
    """(is_ddp, rank, local_rank, world_size) from the environment torchrun sets."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# -----------------------------------------------------------------------------
# Before a GPU run spends money: does CUDA work, with every GPU the run needs?


class DriverTooOld(UserError):
    """The NVIDIA driver is older than the CUDA this torch was built for; `command` installs the build for it."""

    def __init__(self, message, command):
        super().__init__(message)
        self.command = command


def cuda_driver_version():
    """The newest CUDA the installed NVIDIA driver supports, as (major, minor), or None when there is no driver.
    Asked of the driver library itself, so it answers where torch cannot start CUDA."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int()
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return version.value // 1000, version.value % 1000 // 10  # 13020 -> (13, 2)


def check_cuda(device_type, num_gpus):
    """One line saying what a run of num_gpus processes will use, or a UserError saying why it cannot start: no
    CUDA build of torch, no NVIDIA driver, a driver older than the torch build (DriverTooOld, with the command that
    installs the matching build), CUDA failing for another reason (torch's own words), or fewer GPUs than needed.
    A CPU run passes only when asked for (device_type='cpu'): a pipeline must never fall back to it quietly."""
    if device_type == "cpu":
        return f"device_type=cpu, as asked: {num_gpus} process(es) on the CPU, no GPU used"
    if device_type != "cuda":
        raise UserError(f"device_type={device_type!r}: expected cuda, or cpu to run without a GPU")
    no_gpu_hint = "(a run without a GPU must say so: --device_type=cpu)"
    if torch.version.cuda is None:
        raise UserError(f"torch {torch.__version__} is a build without CUDA: `uv sync --frozen` installs the locked "
                        f"CUDA build {no_gpu_hint}")
    driver = cuda_driver_version()
    if driver is None:
        raise UserError(f"no GPU: the NVIDIA driver library (libcuda.so.1) is not on this machine {no_gpu_hint}")
    driver_text, build = f"{driver[0]}.{driver[1]}", tuple(int(part) for part in torch.version.cuda.split(".")[:2])
    try:
        torch.cuda.init()  # raises with the driver's own words when CUDA cannot start
        count = torch.cuda.device_count()
    except Exception as e:
        if driver < build:
            version = torch.__version__.split("+")[0]
            tag = f"cu{driver[0]}{driver[1]}"
            command = ["uv", "pip", "install", "--reinstall-package", "torch", f"torch=={version}+{tag}",
                       "--index-url", f"https://download.pytorch.org/whl/{tag}"]
            raise DriverTooOld(f"the NVIDIA driver supports CUDA up to {driver_text}, older than the CUDA "
                               f"{torch.version.cuda} this torch {torch.__version__} was built for. Install the build "
                               f"for this driver (or update the driver): {' '.join(command)}", command) from None
        raise UserError(f"CUDA does not start (torch {torch.__version__} built for CUDA {torch.version.cuda}, driver "
                        f"supports {driver_text}): {str(e).strip() or type(e).__name__}") from None
    if count < num_gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise UserError(f"the run needs {num_gpus} GPUs (NPROC_PER_NODE={num_gpus}) but torch sees {count}"
                        + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
                        + f": set NPROC_PER_NODE={count} (fewer GPUs give the same result, slower)")
    return (f"CUDA works: {count} GPU(s), {torch.cuda.get_device_name(0)}, driver CUDA {driver_text}, torch "
            f"{torch.__version__}; the run uses {num_gpus}")


# Fixed prompts whose greedy continuations show, in the training logs and the report, what a base model knows
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


def cpu_name():
    """The CPU model as /proc/cpuinfo names it (for reports and benchmark JSON)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_native_bf16():
    """True when the CPU multiplies bf16 matrices in hardware (AMX or AVX-512 BF16); then bf16 beats fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _default_compute_dtype():
    choices = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
    override = os.environ.get("NANOCHAT_DTYPE")
    if override:
        if override not in choices:
            raise UserError(f"NANOCHAT_DTYPE={override!r} is not one of {sorted(choices)}")
        return choices[override]
    if torch.cuda.is_available():
        # bf16 tensor cores from Ampere (SM 80) on; older GPUs stay in fp32 (fp16 would need a grad scaler)
        return torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float32
    if torch.backends.mps.is_available():
        return torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


# The dtype activations and matmuls run in. Weights stay fp32 (the optimizer's master copy) and are cast
# at use; there is no autocast, so what runs where is explicit and identical on every device.
COMPUTE_DTYPE = _default_compute_dtype()


def compute_init(device_type=""):
    """Seed, pick the device, and join the process group when launched by torchrun.
    Returns (is_ddp, rank, local_rank, world_size, device)."""
    device_type = device_type or autodetect_device_type()
    allowed = ("cuda", "mps", "cpu")
    if device_type not in allowed:
        raise UserError(f"device_type={device_type!r} is not one of {allowed}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("device_type='cuda' but torch sees no CUDA GPU; use --device_type=cpu")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise UserError("device_type='mps' but MPS is not available; use --device_type=cpu")

    random.seed(42)
    torch.manual_seed(42)
    if device_type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"  # tf32 for any fp32 matmul that remains
        torch.backends.cudnn.conv.fp32_precision = "tf32"

    is_ddp, rank, local_rank, world_size = get_dist_info()
    if is_ddp and device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
        dist.barrier()
    elif is_ddp:
        device = torch.device(device_type)
        dist.init_process_group(backend="gloo")  # gloo: the CPU backend (MPS has no collective backend)
        dist.barrier()
    else:
        device = torch.device(device_type)
    if rank == 0:
        logger.info(f"device={device} world_size={world_size} compute_dtype={COMPUTE_DTYPE}")
    return is_ddp, rank, local_rank, world_size, device


def check_same_on_all_ranks(values, what):
    """Raise if `values` (a picklable list, e.g. each step's LR multiplier) differs between ranks: a mismatch would
    silently desynchronize the replicas, which no DDP wrapper re-averages here. A no-op in a single process."""
    gathered = all_ranks_gather(values)
    if len(gathered) == 1:
        return
    if any(other != gathered[0] for other in gathered):
        raise RuntimeError(f"ranks used different {what}: {gathered}")
    print0(f"{what} identical on all {len(gathered)} ranks ({len(values)} steps)")


def dist_rank_and_size():
    """(rank, world_size) of the default process group, or (0, 1) when none is up."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_ranks_sum(values, device=None):
    """The sum over all ranks of what each rank measured on its share: a tensor is summed in place and returned; a
    number or a list of numbers (token counts, rewards, pass counts) goes through a float64 tensor on device (the
    process group's device: NCCL reduces CUDA tensors only) and comes back as Python floats. A no-op in one process."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float64, device=device)
    if dist_rank_and_size()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return values if isinstance(values, torch.Tensor) else tensor.tolist()


def all_ranks_gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects: a data position, an RNG state)."""
    world_size = dist_rank_and_size()[1]
    if world_size == 1:
        return [obj]
    objects = [None] * world_size
    dist.all_gather_object(objects, obj)
    return objects


def peak_memory(device):
    """The process's peak memory so far, as text: the CUDA allocator's peak on a GPU, else the peak RSS."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB (GPU)"
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
    return f"{max_rss / (2**20 if sys.platform == 'darwin' else 2**10):,.0f} MiB (process RSS)"


class StopOnSignal:
    """Ctrl+C and SIGTERM only raise a flag (.requested) that a training loop checks at the end of each step, to
    save a checkpoint and exit cleanly. Repeated signals change nothing (torchrun forwards the terminal's Ctrl+C to
    its workers a second time, which must not abort the save)."""

    def __init__(self, rank, what="saving a checkpoint at the end of this step, then exiting"):
        self.requested, self.rank, self.what = False, rank, what
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        if not self.requested:
            print(f"[rank {self.rank}] got {signal.Signals(signum).name}: {self.what}", flush=True)
        self.requested = True


def grad_accum_steps(total_name, total, device_batch_size, world_size, row_tokens=None):
    """Micro-steps per optimizer step, printed with how a step is made up: `total` (the setting total_name) tokens
    per step when row_tokens (max_seq_len) is given, else rows (conversations). It must divide exactly by what one
    micro-step of every process takes, so that a step sees the same data whatever the hardware."""
    per_micro_step = device_batch_size * (row_tokens or 1) * world_size
    factors = ["device_batch_size", "max_seq_len", "world_size"] if row_tokens else ["device_batch_size", "world_size"]
    values = [device_batch_size, row_tokens, world_size] if row_tokens else [device_batch_size, world_size]
    if total % per_micro_step != 0:
        raise UserError(f"{total_name}={total:,} is not a multiple of {' * '.join(factors)} = "
                        f"{' * '.join(map(str, values))} = {per_micro_step:,}; change one of these settings")
    steps = total // per_micro_step
    print0(f"{'Tokens' if row_tokens else 'Rows'} per step: {total:,} = {world_size} process(es) x {steps} micro-step(s) "
           f"x {device_batch_size} rows" + (f" x {row_tokens} tokens" if row_tokens else ""))
    return steps


def should_compile(setting, device):
    """The --compile setting of the training scripts: auto (on CUDA only: on CPU compiling pays off only for long
    runs) | true | false."""
    choices = {"auto": device.type == "cuda", "true": True, "false": False}
    if str(setting).lower() not in choices:
        raise UserError(f"--compile={setting}: expected one of auto, true, false")
    return choices[str(setting).lower()]


def format_duration(seconds):
    """12s, 3m04s or 2h05m: durations in logs and reports."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def compute_cleanup():
    if dist.is_available() and dist.is_initialized():
        # All ranks leave together: gloo aborts a process that is still inside a collective (even a barrier's last
        # message) when a peer closes its connections. So each rank also says "done" through the rendezvous store,
        # which outlives the process group, and waits for everyone's before the connections are torn down.
        dist.barrier()
        store = dist.distributed_c10d._get_default_store()
        store.set(f"nanochat_cleanup_{dist.get_rank()}", "done")
        store.wait([f"nanochat_cleanup_{rank}" for rank in range(dist.get_world_size())])
        dist.destroy_process_group()


# Dense bf16 tensor-core peak FLOP/s per GPU (datasheet numbers, no sparsity). Matched by substring of
# torch.cuda.get_device_name(), most specific first. Unknown GPUs give inf, so MFU reads 0% rather than a lie.
GPU_PEAK_FLOPS = [
    ("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12),
    ("GH200", 989e12), ("B200", 2250e12), ("B100", 1750e12), ("A100", 312e12), ("A800", 312e12),
    ("A10G", 70e12), ("A10", 125e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("RTX 5090", 209e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("RTX A6000", 155e12), ("V100", 125e12),
    ("T4", 65e12), ("MI300X", 1307e12), ("MI250X", 383e12),
]


@lru_cache(maxsize=None)
def measure_cpu_matmul_flops(dtype=torch.float32, size=2048, seconds=0.5):
    """This machine's attainable matmul FLOP/s: the best of repeated square matmuls. CPUs have no
    datasheet peak worth trusting (clocks, cores, SIMD width all vary), so MFU on CPU is measured
    against what a plain matmul achieves here. The matmul is F.linear's (x @ W^T), the layout every
    layer of the model uses: in bf16 the plain a @ b layout can take a much slower kernel."""
    a = torch.randn(size, size, dtype=dtype)
    w = torch.randn(size, size, dtype=dtype)
    torch.nn.functional.linear(a, w)  # warm-up (thread pool, kernels)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.nn.functional.linear(a, w)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def get_peak_flops(device, dtype=None):
    """Peak FLOP/s of one device for MFU: the table on CUDA, a measured matmul peak on CPU, inf otherwise."""
    dtype = dtype or COMPUTE_DTYPE
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS:
            if key in name:
                return flops if dtype in (torch.bfloat16, torch.float16) else flops / 2  # fp32 runs as tf32
        return float("inf")
    if device.type == "cpu":
        return measure_cpu_matmul_flops(dtype)
    return float("inf")


# -----------------------------------------------------------------------------
# Experiment tracking


class DummyWandb:
    """Stands in for a wandb run when logging is off, so scripts call .log() and .finish() unconditionally."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def init_wandb(run, user_config, master_process, project="nanochat"):
    """A real wandb run only when asked for (run != 'dummy') on the master process and wandb works;
    a missing install or login never blocks training."""
    if run == "dummy" or not master_process:
        return DummyWandb()
    try:
        import wandb
        return wandb.init(project=project, name=run, config=user_config)
    except Exception as e:  # not installed, not logged in, offline...
        logger.warning(f"wandb unavailable ({e}); continuing without it")
        return DummyWandb()


# -----------------------------------------------------------------------------
# Downloads


def write_atomic(path, write):
    """write(file) into a temporary file beside path (binary mode), flushed to disk, then renamed over path: a
    crash mid-write leaves the previous file (or none), never a half-written one. Checkpoints, tokenizer, report."""
    tmp_path = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp_path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def download_file(url, path, attempts=5, timeout=30, validate=None, desc=None, backoff=1.0):
    """Download url to path safely: stream into a temp file beside it, let validate(tmp_path) reject a bad
    body (truncated, an HTML error page, ...), then rename, so path is either absent or complete. Retries
    with exponential backoff; raises RuntimeError naming the url after the last attempt."""
    tmp_path = f"{path}.tmp{os.getpid()}"
    last_error = None
    for attempt in range(1, attempts + 1):
        try:
            with requests.get(url, stream=True, timeout=timeout) as response:
                response.raise_for_status()
                expected = int(response.headers.get("Content-Length", 0)) or None
                written = 0
                with open(tmp_path, "wb") as f:
                    for chunk in response.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
                        written += len(chunk)
            if expected is not None and written != expected:
                raise IOError(f"truncated body: got {written:,} of {expected:,} bytes")
            if validate is not None:
                validate(tmp_path)
            os.replace(tmp_path, path)
            return path
        except Exception as e:
            last_error = e
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
            if isinstance(e, requests.HTTPError) and e.response is not None and e.response.status_code == 404:
                break  # a missing file will not appear by retrying
            if attempt < attempts:
                wait = backoff * 2 ** (attempt - 1)
                logger.warning(f"{desc or url}: attempt {attempt}/{attempts} failed ({e}); retrying in {wait:g}s")
                time.sleep(wait)
    raise RuntimeError(f"download of {url} failed after {attempt} attempt(s): {last_error}")


def download_file_with_lock(url, filename, **kwargs):
    """Download url into <base dir>/filename once, even when every rank asks at the same time:
    the first rank takes the lock and downloads, the others wait and then find the file."""
    path = os.path.join(get_base_dir(), filename)
    with FileLock(path + ".lock"):
        if not os.path.exists(path):
            download_file(url, path, **kwargs)
    return path


if __name__ == "__main__":
    # speedrun.sh's check after set-up, e.g. python -m nanochat.common --device_type=cuda --nproc_per_node=8
    import argparse
    import subprocess

    parser = argparse.ArgumentParser(description="Check that this machine can run a pipeline of nproc_per_node "
                                     "processes on device_type (check_cuda); an `error:` line says why not.")
    parser.add_argument("--device_type", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--nproc_per_node", type=int, default=1)
    parser.add_argument("--install_torch", action="store_true",
                        help="when the driver is older than torch's CUDA, install the matching build and check again")
    args = parser.parse_args()
    try:
        print(check_cuda(args.device_type, args.nproc_per_node))
    except DriverTooOld as e:
        if not args.install_torch:
            raise
        print(f"{e}\ninstalling it now", flush=True)
        subprocess.run(e.command, check=True)
        # a fresh process imports the new torch; without --install_torch, so this happens at most once
        os.execv(sys.executable, [sys.executable, "-m", "nanochat.common", f"--device_type={args.device_type}",
                                  f"--nproc_per_node={args.nproc_per_node}"])
