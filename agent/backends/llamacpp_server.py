"""Run the real llama.cpp HTTP server in-process through ``xllamacpp``.

Usage::

    python -m agent.backends.llamacpp_server --model PATH --alias NAME \\
        --host 127.0.0.1 --port N [--ctx-size 2048] [--parallel 4] \\
        [--threads N] [--embeddings]

``xllamacpp.Server(params)`` loads the model synchronously (the constructor
returns only once the model is loaded and the socket is bound) and then serves
HTTP from background threads.  This entrypoint prints one line

    llama.cpp server listening on http://HOST:PORT

to stdout (flushed) once that has happened, then blocks until SIGTERM or
SIGINT and exits with status 0 (a signal that arrives while the model is
still loading kills the process at once instead, since xllamacpp holds the
GIL during the load).  ``--port 0`` picks a free port; the printed line
carries the real one.  If the model is missing or fails to load, one line
``llama.cpp server: error: ...`` goes to stderr and the exit status is 1.

With ``LLAMA_API_KEY`` in the environment (the agent sets it: the instance's key, which the gateway
presents) every endpoint but ``/health`` and ``/v1/models`` needs ``Authorization: Bearer KEY``; the
key is not taken as a flag, as a command line is readable by every local user.

llama.cpp's own log goes to stderr.  Endpoints: ``/health``, ``/v1/models``,
``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` (with
``--embeddings``) and ``/metrics`` (``llamacpp:*`` Prometheus lines).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0-65535: {value}")
    return value


def build_arg_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m agent.backends.llamacpp_server",
        description="Serve a GGUF model with the llama.cpp HTTP server (in-process via xllamacpp).",
    )
    ap.add_argument("--model", required=True, help="path to the .gguf model file")
    ap.add_argument("--alias", required=True, help="model name reported by /v1/models and accepted in requests")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ap.add_argument("--port", type=_port, required=True, help="port to bind (0 = pick a free one)")
    ap.add_argument("--ctx-size", type=_positive_int, default=2048,
                    help="total context size in tokens, shared by the slots (default 2048)")
    ap.add_argument("--parallel", type=_positive_int, default=4, help="number of parallel slots (default 4)")
    ap.add_argument("--threads", type=_positive_int, default=None,
                    help="CPU threads for generation and batch processing (default: llama.cpp's choice)")
    ap.add_argument("--embeddings", action="store_true", help="enable the /v1/embeddings endpoint")
    ap.add_argument("--n-gpu-layers", type=int, default=0, help="layers to offload to the GPU (default 0: CPU only)")
    # llama-server's flag, taken so that this wrapper runs with the official image's arguments (as the
    # entrypoint of the Docker tier's image): /metrics is always served here.
    ap.add_argument("--metrics", action="store_true", help="accepted for llama-server compatibility (always on)")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # parse_args (not parse_known_args): unknown flags are an argparse error.
    return build_arg_parser().parse_args(argv)


def _model_declares_pooling(path: str) -> bool:
    """True if the GGUF's metadata names a pooling type (embedding models do).

    Best effort: if the metadata cannot be read, assume it declares one and
    leave the choice to llama.cpp.
    """
    try:
        import gguf

        reader = gguf.GGUFReader(path, "r")
        return any(name.endswith(".pooling_type") for name in reader.fields)
    except Exception:  # noqa: BLE001
        return True


def build_params(args: argparse.Namespace):
    """Translate parsed arguments into an ``xllamacpp.CommonParams``."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = os.path.abspath(args.model)
    params.model_alias = {args.alias}
    params.hostnames = [args.host]
    params.port = args.port
    params.n_ctx = args.ctx_size
    params.n_parallel = args.parallel
    params.endpoint_metrics = True
    params.embedding = bool(args.embeddings)
    if args.embeddings and not _model_declares_pooling(params.model.path):
        # Decoder LLMs carry no pooling type; llama.cpp then uses "none",
        # which /v1/embeddings refuses ("Pooling type 'none' is not OAI
        # compatible").  Mean pooling makes the OpenAI endpoint work.
        params.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
    params.n_gpu_layers = args.n_gpu_layers
    if key := os.environ.get("LLAMA_API_KEY"):
        params.api_keys = [key]
    if args.threads is not None:
        params.cpuparams.n_threads = args.threads
        params.cpuparams_batch.n_threads = args.threads
    return params


def _fail(message: str) -> int:
    print(f"llama.cpp server: error: {message}", file=sys.stderr, flush=True)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    if not os.path.isfile(args.model):
        return _fail(f"model file not found: {args.model}")
    if not os.access(args.model, os.R_OK):
        return _fail(f"model file not readable: {args.model}")

    try:
        import xllamacpp
    except Exception as exc:  # noqa: BLE001 - report, don't trace
        return _fail(f"cannot import xllamacpp: {exc}")

    # xllamacpp.Server() holds the GIL while it loads the model, so a Python
    # signal handler could not run until the load finished (minutes for a big
    # model).  Until the server is up, SIGTERM/SIGINT keep the OS default
    # action: the process dies at once (killed by the signal).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)

    try:
        params = build_params(args)
        # Returns once the model is loaded; the HTTP server (which answers
        # /health with 503 "Loading model" during the load) then runs in
        # background threads owned by this object.
        server = xllamacpp.Server(params)
    except Exception as exc:  # noqa: BLE001 - report, don't trace
        detail = str(exc).strip() or type(exc).__name__
        return _fail(
            f"failed to start with model {args.model} on {args.host}:{args.port}: {detail} "
            "(see the llama.cpp log above for the cause)"
        )

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    try:
        address = server.listening_address
    except Exception:  # noqa: BLE001
        address = None
    if not address:
        address = f"http://{args.host}:{args.port}"
    try:
        print(f"llama.cpp server listening on {address}", flush=True)
    except OSError:  # stdout closed by the parent: keep serving anyway
        pass

    # Wake at intervals so the signal handlers always get to run promptly.
    while not stop.wait(0.5):
        pass

    # Do not destroy the server object: xllamacpp's ~Server stops the task
    # loop first and then joins the HTTP threads, so a request in flight
    # (e.g. an SSE stream) waits forever for results and the destructor,
    # which holds the GIL, hangs the process.  Nothing needs persisting, so
    # end the process directly; the kernel closes the sockets.
    try:
        print("llama.cpp server: stopping", file=sys.stderr, flush=True)
        sys.stdout.flush()
    except OSError:
        pass
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
