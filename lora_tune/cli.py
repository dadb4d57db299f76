"""The `lora-tune` command: a thin layer over the library. Heavy imports happen inside the verbs that need them."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any

from lora_tune import __version__
from lora_tune.errors import LoraTuneError, OptionError
from lora_tune.recipe.rules import OBJECTIVES  # light: no ML library, so --help stays fast
from lora_tune.run.secrets import RedactingStream, install_log_redaction

EXIT_OK, EXIT_FAILURE, EXIT_USER_ERROR = 0, 1, 2
# lora_tune.export.gguf.QUANTS, spelled out so that `--help` imports nothing heavy (a test keeps them equal)
GGUF_QUANTS = ("f16", "bf16", "q8_0", "q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool whose reader closed the pipe


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # KEY=VALUE overrides may come before or after flags (`train r.yaml --overwrite a.b=1`); argparse alone
    # stops collecting a positional list at the first flag, so the rest is gathered here.
    args, extra = parser.parse_known_args(argv)
    overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    unknown = [item for item in extra if item not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    return run_verb(args.handler, args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-tune",
        description="Recipe-driven LoRA / QLoRA fine-tuning of causal language models.",
        epilog="Exit codes: 0 ok, 2 recipe or data error, 1 anything else. See docs/recipes.md for the recipe format.",
    )
    parser.add_argument("--version", action="version", version=f"lora-tune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and library logs")
    verbs = parser.add_subparsers(dest="command", metavar="COMMAND")

    groups = (_add_recipe_verbs, _add_run_verbs, _add_export_verbs, _add_planning_verbs, _add_serve_verbs)
    subparsers = [add(verbs) for add in (*groups, _add_ui_verb)]
    for sub in (sub for group in subparsers for sub in group):
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sub.set_defaults(names=_names(sub))
    return parser


def _names(sub: argparse.ArgumentParser) -> dict[str, str]:
    """The verb's flag for each value it passes on, by argparse's dest, which is the library's parameter name
    (`quant` -> `--quant`, a positional `run_dir` -> `RUN_DIR` as the usage line shows it). Read from the parser
    itself, so that no second table can drift from the flags."""
    names = {}
    for action in sub._actions:  # argparse has no public list of a parser's arguments
        flags = [flag for flag in action.option_strings if flag.startswith("--")]
        if flags:
            names[action.dest] = flags[0]
        elif not action.option_strings and action.dest != argparse.SUPPRESS:
            names[action.dest] = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
    return names


def _add_recipe_verbs(verbs: Any) -> list[argparse.ArgumentParser]:
    """train, validate, check, data: a recipe in, a run or a report out."""
    train = verbs.add_parser("train", help="train the adapter a recipe describes")
    _recipe_arguments(train)
    train.add_argument("--overwrite", action="store_true", help="replace a previous run in the output directory")
    train.add_argument(
        "--nproc", type=int, default=1, metavar="N", help="run N processes on this machine (one per GPU) via torchrun"
    )
    train.add_argument(
        "--resume", action="store_true", help="continue the run in the output directory from its newest checkpoint"
    )
    train.set_defaults(handler=cmd_train)

    validate = verbs.add_parser("validate", help="check a recipe without loading any model")
    _recipe_arguments(validate)
    validate.add_argument("--print", action="store_true", dest="print_resolved", help="print the resolved recipe")
    validate.set_defaults(handler=cmd_validate)

    check = verbs.add_parser(
        "check", help="pre-flight check of the recipe's data and tokenizer (stop token, masks, template); no weights"
    )
    _recipe_arguments(check)
    check.add_argument("--json", metavar="FILE", default=None, help="also write the full report as JSON")
    check.set_defaults(handler=cmd_check)

    data = verbs.add_parser(
        "data", help="preview the training data: counts, lengths, drops, padding, trained tokens; loads no weights"
    )
    _recipe_arguments(data)
    data.add_argument("--n", type=int, default=3, metavar="N", help="examples to show (default 3)")
    data.set_defaults(handler=cmd_data)
    return [train, validate, check, data]


def _add_run_verbs(verbs: Any) -> list[argparse.ArgumentParser]:
    """eval, generate, chat: a finished run (or a merged folder) put to use."""
    evaluate = verbs.add_parser(
        "eval",
        help="score a run (adapter, model/ folder or classification head) on held-out data, side by side with "
        "its base; writes eval.json and eval.md",
    )
    evaluate.add_argument("run_dir", help="run directory written by `lora-tune train`")
    evaluate.add_argument("--data", default=None, help="a .jsonl file in alpaca or messages form")
    evaluate.add_argument(
        "--split", default=None, help="a split saved in the run (RUN_DIR/NAME.jsonl); default: test, when no --data"
    )
    evaluate.add_argument(
        "--base",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also evaluate the base model, side by side (default; --no-base skips it)",
    )
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate the first N rows only")
    evaluate.add_argument("--max-new-tokens", type=int, default=None, help="override eval.max_new_tokens")
    evaluate.add_argument("--batch-size", type=int, default=None, help="override eval.batch_size")
    evaluate.set_defaults(handler=cmd_eval)

    generate = verbs.add_parser("generate", help="answer one prompt with a run's adapter or a merged model")
    generate.add_argument("model_dir", help="run directory, or a merged model folder from `lora-tune merge`")
    generate.add_argument("prompt", help="the user message")
    _generation_arguments(generate)
    generate.add_argument("--image", action="append", default=[], help="a picture for a vision run (repeatable)")
    generate.add_argument("--no-stream", dest="stream", action="store_false", help="print the answer when complete")
    generate.set_defaults(handler=cmd_generate)

    chat = verbs.add_parser("chat", help="interactive multi-turn chat with a run's adapter or a merged model")
    chat.add_argument("model_dir", help="run directory, or a merged model folder from `lora-tune merge`")
    _generation_arguments(chat)
    chat.add_argument("--image", action="append", default=[], help="a picture for the first turn (vision runs)")
    chat.set_defaults(handler=cmd_chat)
    return [evaluate, generate, chat]


def _add_export_verbs(verbs: Any) -> list[argparse.ArgumentParser]:
    """merge, push: a run made into a standalone model, and published."""
    merge = verbs.add_parser("merge", help="merge a run's adapter into its base: a standalone transformers folder")
    merge.add_argument("run_dir", help="run directory written by `lora-tune train`")
    merge.add_argument("--output", required=True, help="folder to write (must be new or empty, unless --overwrite)")
    merge.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="dtype of the merged weights")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    merge.add_argument("--no-verify", dest="verify", action="store_false", help="skip the logits check")
    merge.add_argument(
        "--from-dequantized",
        action="store_true",
        help="merge into the NF4-dequantized base (QLoRA runs): exactly the function that was trained",
    )
    merge.add_argument(
        "--push-to-hub", metavar="ORG/NAME", default=None, help="after a successful merge, push the folder there"
    )
    merge.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository as private")
    merge.set_defaults(handler=cmd_merge)

    push = verbs.add_parser("push", help="upload a merged folder, or a run's adapter + model card, in one commit")
    push.add_argument("folder", help="a merged folder or a run directory")
    push.add_argument("repo_id", metavar="ORG/NAME", help="hub repository (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--dry-run", action="store_true", help="list the files and sizes; upload nothing")
    push.add_argument("--message", default=None, help="commit message (default names the run)")
    push.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="give up on a hub request after this long without an answer, 3 tries per call "
        "(default: LORA_TUNE_HUB_TIMEOUT, else 30)",
    )
    push.set_defaults(handler=cmd_push)

    export = verbs.add_parser("export", help="write a run or a merged folder as a GGUF file (llama.cpp, Ollama)")
    export.add_argument("source", help="run directory, or a merged folder from `lora-tune merge`")
    export.add_argument("--format", choices=("gguf",), default="gguf", help="output format (default gguf)")
    export.add_argument(
        "--quant",
        choices=GGUF_QUANTS,
        default="q8_0",
        help="f16, bf16 and q8_0 need nothing more; k-quants (q4_k_m ...) need llama-cpp-python (default q8_0)",
    )
    export.add_argument("--output", default=None, help="folder for the .gguf, Modelfile, card (default SOURCE-gguf)")
    export.add_argument(
        "--merge-dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="a run is merged first, in this dtype"
    )
    export.add_argument("--overwrite", action="store_true", help="replace a file of the same quant in --output")
    export.set_defaults(handler=cmd_export)
    return [merge, push, export]


def _add_planning_verbs(verbs: Any) -> list[argparse.ArgumentParser]:
    """recipes, new, plan: choosing and sizing a recipe before any run."""
    recipes = verbs.add_parser("recipes", help="list the recipe catalog, or show one recipe; imports no torch")
    recipes.add_argument("name", nargs="?", default=None, help="a recipe to show, e.g. qwen/qwen3-8b-qlora-chat")
    recipes.add_argument("--dir", default=None, help="catalog folder (default: ./recipes, else the checkout's)")
    recipes.set_defaults(handler=cmd_recipes)

    new = verbs.add_parser("new", help="write a starting recipe for a model, a method and a data file (stdout)")
    new.add_argument("--model", required=True, help="hub id or local folder of the base model")
    new.add_argument("--method", required=True, choices=("qlora", "lora"), help="qlora: 4-bit base; lora: 16-bit")
    new.add_argument(
        "--objective",
        default="sft",
        choices=tuple(OBJECTIVES),
        help="sft (default), or a preference stage on prompt/chosen/rejected rows (kto: prompt/completion/label)",
    )
    new.add_argument("--data", required=True, help="a local .jsonl or .json file; its format is detected")
    new.add_argument("--gpu-memory", default="24GiB", help="memory of the GPU to size for (default 24GiB)")
    new.add_argument(
        "--dir", default=None, help="catalog folder with configs/ (default: ./recipes, else the checkout's)"
    )
    new.set_defaults(handler=cmd_new)

    plan = verbs.add_parser(
        "plan",
        help="estimate the run's peak GPU memory from the model's config (no weights), whether it fits, each memory "
        "lever's saving and time cost, and the longest context that fits",
    )
    _recipe_arguments(plan)
    plan.add_argument("--gpu-memory", metavar="SIZE", default=None, help="GPU size, e.g. 24GiB (default: detected)")
    plan.add_argument("--config", metavar="PATH", default=None, help="the model's config.json (file or folder)")
    plan.set_defaults(handler=cmd_plan)
    return [recipes, new, plan]


def _add_serve_verbs(verbs: Any) -> list[argparse.ArgumentParser]:
    """serve: a run, a merged folder or a GGUF file behind an OpenAI-compatible HTTP API."""
    serve = verbs.add_parser(
        "serve", help="serve a run, a merged folder or a .gguf file over an OpenAI-compatible HTTP API"
    )
    serve.add_argument("model_path", metavar="PATH", help="run directory, merged model folder or .gguf file")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    serve.add_argument(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` (default: LORA_TUNE_API_KEY; prefer it, argv is visible to ps)",
    )
    serve.add_argument("--model-name", default=None, help="the model id clients use (default: the path's name)")
    serve.add_argument(
        "--max-tokens-limit", type=int, default=1024, metavar="N", help="most tokens one request may generate"
    )
    serve.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, metavar="N", help="largest request body (default 1 MiB)"
    )
    serve.add_argument("--max-waiting", type=int, default=64, metavar="N", help="queued requests before 503")
    serve.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM / Ctrl-C, how long requests in flight may take to finish (default 30; a second signal "
        "exits at once)",
    )
    serve.add_argument(
        "--parallel",
        type=int,
        default=16,
        metavar="N",
        help="requests generated at once: rows of one batch (transformers), llama.cpp contexts for a .gguf (at most "
        "4); default 16",
    )
    serve.add_argument(
        "--engine",
        choices=["lora-tune", "vllm"],
        default="lora-tune",
        help="vllm: check that vLLM can load the run's adapter and print the `vllm serve` command (GPU machines)",
    )
    serve.set_defaults(handler=cmd_serve)
    return [serve]


def _add_ui_verb(verbs: Any) -> list[argparse.ArgumentParser]:
    """ui: the web page over all of the above (the `ui` extra: pip install 'lora-tune[ui]')."""
    page = verbs.add_parser("ui", help="a web page for recipes, data, training, runs, eval, chat and export")
    page.add_argument("--runs", default="runs", metavar="DIR", help="folder whose runs the page lists (default runs)")
    page.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    page.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    page.add_argument(
        "--auth",
        default=None,
        metavar="PASSWORD",
        help="password the page asks for; needed beyond 127.0.0.1 (default: LORA_TUNE_UI_PASSWORD; prefer it, argv "
        "is visible to ps)",
    )
    page.add_argument(
        "--recipes", default=None, metavar="DIR", help="recipe catalog (default ./recipes, else the checkout's)"
    )
    page.set_defaults(handler=cmd_ui)
    return [page]


def _recipe_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("recipe", help="recipe YAML file")
    sub.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. training.max_steps=50")


def _generation_arguments(sub: argparse.ArgumentParser) -> None:
    """Flags that override the run recipe's `eval:` generation settings for one call."""
    sub.add_argument("--system", default=None, help="system message")
    sub.add_argument("--max-new-tokens", type=int, default=None, help="override eval.max_new_tokens")
    sub.add_argument("--sample", action="store_true", default=None, help="sample instead of greedy decoding")
    sub.add_argument("--temperature", type=float, default=None, help="sampling temperature (implies --sample)")
    sub.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (implies --sample)")


# Verbs whose stdout is their result (`answer=$(lora-tune generate RUN "...")`): their log lines go to stderr.
RESULT_ON_STDOUT = frozenset({"generate", "chat", "recipes", "new", "validate", "push"})


def run_verb(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a verb with every line it prints, on stdout and stderr, masked by `redact` (one place, so that no verb
    can forget it); user errors become one line on stderr (exit 2), other failures one line (exit 1)."""
    original = sys.stdout, sys.stderr
    consoles = RedactingStream(original[0]), RedactingStream(original[1])
    sys.stdout, sys.stderr = consoles
    try:
        return _run(handler, args, consoles)
    finally:
        for console in consoles:
            console.release()
        sys.stdout, sys.stderr = original


def _run(
    handler: Callable[[argparse.Namespace], int], args: argparse.Namespace, consoles: tuple[RedactingStream, ...]
) -> int:
    debug = bool(getattr(args, "debug", False)) or os.environ.get("LORA_TUNE_DEBUG") == "1"
    _configure_logging(debug, sys.stderr if getattr(args, "command", None) in RESULT_ON_STDOUT else sys.stdout)
    if not debug:
        _quiet_libraries()
    try:
        code = handler(args)
        for console in consoles:  # here, so that a reader gone away (BrokenPipeError) is handled below
            console.release()
            console.flush()
        return code
    except LoraTuneError as exc:
        if debug:
            raise
        print(f"{_rank()}error: {_in_flags(exc, args)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`lora-tune recipes NAME | head`): stop quietly, as a Unix tool killed by SIGPIPE
        # would; stdout goes to /dev/null so the interpreter's final flush cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence: one line, not a traceback
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"{_rank()}error: {type(exc).__name__}: {first} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILURE


def _in_flags(exc: LoraTuneError, args: argparse.Namespace) -> str:
    """The error as the command line says it: a library parameter an OptionError names becomes the verb's flag for
    it (`quant: ...` -> `--quant: ...`); a name the verb has no argument for (a recipe key) stays as it is."""
    names = getattr(args, "names", {})
    if isinstance(exc, OptionError) and exc.option in names:
        return exc.render(names[exc.option])
    return str(exc)


def _rank() -> str:
    """`[rank 1/4] ` in a multi-process job (torchrun, accelerate launch), so an error says which process failed."""
    from lora_tune.training.distributed import Processes

    return Processes.from_env().prefix()


def _configure_logging(debug: bool, stream: IO[str]) -> None:
    """lora_tune's log lines go to `stream`: stderr for a verb whose stdout is its result, else stdout."""
    import logging

    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s" if not debug else "%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("lora_tune")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False
    from lora_tune.training.distributed import configure_rank_logging

    configure_rank_logging(logger)
    install_log_redaction(logger)


def _quiet_libraries() -> None:
    """Keep the console for progress bars and our summary; library warnings show with --debug."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging
    import warnings

    warnings.filterwarnings("ignore", module=r"(transformers|peft|trl|bitsandbytes|torch|accelerate)\b.*")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retry warnings; push says what failed


def cmd_validate(args: argparse.Namespace) -> int:
    from lora_tune.recipe.describe import describe
    from lora_tune.recipe.load import dump_resolved, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_resolved:
        print(dump_resolved(recipe), end="")
        return EXIT_OK
    print(f"ok: {args.recipe}: {describe(recipe)}")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from lora_tune import tasks
    from lora_tune.recipe.load import load_recipe

    report = tasks.check(load_recipe(args.recipe, args.overrides), json_path=args.json)
    print(report.format())
    return EXIT_OK if report.passed else EXIT_USER_ERROR


def cmd_data(args: argparse.Namespace) -> int:
    from lora_tune import tasks
    from lora_tune.recipe.load import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    # The tokenizer only: the preview never loads model weights.
    print(tasks.preview(recipe, n=max(0, args.n), color=sys.stdout.isatty()))
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from lora_tune.plan.levers import plan_report
    from lora_tune.recipe.load import load_recipe

    recipe = load_recipe(args.recipe, args.overrides, check_paths=False)  # the plan reads no data
    print(plan_report(recipe, config=args.config, gpu_memory=args.gpu_memory))
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from lora_tune.recipe.describe import describe
    from lora_tune.recipe.load import load_recipe
    from lora_tune.training.distributed import Processes

    if args.nproc < 1:
        raise LoraTuneError(f"--nproc: expected a number of processes >= 1, got {args.nproc}")
    recipe = load_recipe(args.recipe, args.overrides)
    procs = Processes.from_env()
    if args.nproc > 1 and not procs.distributed:
        return _launch(recipe, args)
    if procs.is_main:
        print(f"lora-tune: {describe(recipe)}", flush=True)
    from lora_tune.tasks import train
    from lora_tune.training.result import format_summary

    result = train(
        recipe, overwrite=args.overwrite, resume=args.resume, recipe_path=args.recipe, overrides=args.overrides
    )
    if procs.is_main:
        print(format_summary(result))
    return EXIT_OK


def _launch(recipe, args: argparse.Namespace) -> int:  # noqa: ANN001 - Recipe, imported lazily
    """`train --nproc N`: the same command in N processes, through torchrun (or accelerate launch)."""
    from lora_tune.training.distributed import launch_command, run_launcher

    forwarded = [args.recipe, *args.overrides, *(["--overwrite"] if args.overwrite else [])]
    forwarded += ["--resume"] if args.resume else []
    forwarded += ["--debug"] if getattr(args, "debug", False) else []
    command = launch_command(recipe, args.nproc, forwarded)
    print(f"lora-tune: starting {args.nproc} processes: {' '.join(command[1:6])} ...", flush=True)
    return run_launcher(command)


def cmd_eval(args: argparse.Namespace) -> int:
    from lora_tune.tasks import evaluate_run, format_report

    report = evaluate_run(
        args.run_dir,
        args.data,
        split=args.split,
        base=args.base,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    print(format_report(report, args.run_dir))
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    from lora_tune.inference import vision
    from lora_tune.inference.chat import ChatSession
    from lora_tune.inference.load import load_for_inference

    if args.image or vision.is_vision_folder(args.model_dir):
        loaded = _with_generation_flags(vision.load_vision_for_inference(args.model_dir), args)
        print(vision.generate_with_images(loaded, args.prompt, args.image, system=args.system))
        return EXIT_OK
    session = ChatSession(_with_generation_flags(load_for_inference(args.model_dir), args), system=args.system)
    answer = session.ask(args.prompt, stream=sys.stdout if args.stream else None)
    if not args.stream:
        print(answer)
    return EXIT_OK


def cmd_chat(args: argparse.Namespace) -> int:
    from lora_tune.inference import vision
    from lora_tune.inference.chat import chat_loop
    from lora_tune.inference.load import load_for_inference

    if args.image or vision.is_vision_folder(args.model_dir):
        loaded = _with_generation_flags(vision.load_vision_for_inference(args.model_dir), args)
        vision.vision_chat_loop(loaded, args.image, system=args.system, stdin=sys.stdin, stdout=sys.stdout)
        return EXIT_OK
    chat_loop(_with_generation_flags(load_for_inference(args.model_dir), args), system=args.system)
    return EXIT_OK


def _with_generation_flags(loaded, args: argparse.Namespace):  # noqa: ANN001, ANN202 - LoadedModel, lazily imported
    """The loaded model with the flags of _generation_arguments overriding its `eval:` settings."""
    from lora_tune.inference.chat import with_generation

    return with_generation(
        loaded, max_new_tokens=args.max_new_tokens, sample=args.sample, temperature=args.temperature, top_p=args.top_p
    )


def cmd_merge(args: argparse.Namespace) -> int:
    import re

    from lora_tune.export import ExportError, merge
    from lora_tune.export.push import REPO_ID, check_repo_id
    from lora_tune.export.result import format_merge

    # How the flags combine and what --push-to-hub looks like are the command line's to say, as argparse's own
    # checks are; the hub's rules on the id are the library's (check_repo_id), asked before a merge of many minutes.
    if args.private and not args.push_to_hub:
        raise ExportError("--private needs --push-to-hub ORG/NAME")
    if args.push_to_hub and not re.match(REPO_ID, args.push_to_hub):
        raise ExportError(f"--push-to-hub: expected ORG/NAME, got '{args.push_to_hub}'")
    if args.push_to_hub:
        check_repo_id(args.push_to_hub)
    result = merge(
        args.run_dir,
        args.output,
        dtype=args.dtype,
        overwrite=args.overwrite,
        verify=args.verify,
        from_dequantized=args.from_dequantized,
    )
    print(format_merge(result, next_step=not args.push_to_hub), flush=True)
    if args.push_to_hub:
        from lora_tune.export.push import format_push, push

        print(format_push(push(result.output, args.push_to_hub, private=args.private)))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from lora_tune.export.gguf import export_gguf, format_gguf

    result = export_gguf(
        args.source, args.output, quant=args.quant, merge_dtype=args.merge_dtype, overwrite=args.overwrite
    )
    print(format_gguf(result), flush=True)
    return EXIT_OK


def cmd_push(args: argparse.Namespace) -> int:
    from lora_tune.export.push import format_push, push

    result = push(
        args.folder,
        args.repo_id,
        private=args.private,
        dry_run=args.dry_run,
        message=args.message,
        timeout=args.timeout,
    )
    print(format_push(result))
    return EXIT_OK


def cmd_recipes(args: argparse.Namespace) -> int:
    from lora_tune.plan.catalog import catalog_dir, find_entry, format_entry, format_table, list_catalog

    root = catalog_dir(args.dir)
    print(format_entry(find_entry(root, args.name)) if args.name else format_table(list_catalog(root)))
    return EXIT_OK


def cmd_new(args: argparse.Namespace) -> int:
    from lora_tune.plan.catalog_location import catalog_dir_if_any
    from lora_tune.plan.new import new_recipe

    recipe = new_recipe(
        args.model, args.method, args.data, args.gpu_memory, catalog_dir_if_any(args.dir), args.objective
    )
    print(recipe, end="")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    if args.engine == "vllm":
        from lora_tune.serve.vllm import vllm_command

        print(vllm_command(args.model_path, model_name=args.model_name, host=args.host, port=args.port))
        return 0
    from lora_tune.serve.start import serve_model

    return serve_model(
        args.model_path,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        model_name=args.model_name,
        max_tokens_limit=args.max_tokens_limit,
        max_body_bytes=args.max_body_bytes,
        max_waiting=args.max_waiting,
        shutdown_grace=args.shutdown_grace,
        parallel=args.parallel,
    )


def cmd_ui(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lora_tune.plan.catalog_location import catalog_dir_if_any

    try:
        from lora_tune.ui.app import PASSWORD_ENV, serve_ui
    except ImportError as exc:
        if (exc.name or "").split(".")[0] == "lora_tune":
            raise
        raise LoraTuneError(
            f"lora-tune ui needs the ui extra ({exc.name} is missing): pip install 'lora-tune[ui]'"
        ) from None
    password = args.auth or os.environ.get(PASSWORD_ENV) or None
    catalog = catalog_dir_if_any(args.recipes)
    return serve_ui(Path(args.runs), host=args.host, port=args.port, password=password, catalog=catalog)


if __name__ == "__main__":
    sys.exit(main())
