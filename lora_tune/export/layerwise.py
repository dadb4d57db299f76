"""Verify a merge one decoder layer at a time: base + adapter and the merged folder, read from their safetensors files.

The model's own class runs the forward pass (embedding scale, rotary embeddings, causal and sliding-window masks,
final norm, logit soft-capping), built on the meta device from config.json, so it holds no weights. Its embedding,
each decoder layer, the final norm and the output layer get their tensors only while they run, once for each side:

- reference: the base tensors (modules_to_save copies where the adapter has them) with the LoRA path added beside
  each adapted layer as peft computes it, `W x + s * B (A x)` (DoRA: `m / ||W + s B A||_row * (...)`); inputs are
  never multiplied by a merged matrix;
- merged: the tensors the merge wrote, read back from the output folder.

The batch holds the inputs twice, the first half for the reference and the second for the merged model; each
wrapped module runs both sides on the whole batch and passes on the reference's rows of the first half and the
merged model's rows of the second. So each side carries its own hidden states to its own logits, and each layer is
also measured alone: the merged layer against the reference layer on the same (reference) input, which names the
layer a wrong merge broke. Peak memory is about one decoder layer in float32, plus the embedding rows the inputs use
and one block of the output matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_tune.export.shards import ShardTensors
from lora_tune.export.streaming import AdapterPlan, LoraUpdate
from lora_tune.model.weights import WeightsError, match_names

if TYPE_CHECKING:
    import torch


class LayerwiseUnsupported(Exception):
    """The layer-by-layer path cannot run this architecture or adapter; the whole-model check takes over."""


@dataclass
class LayerDifference:
    """One decoder layer, measured alone: merged layer vs reference layer on the reference's input."""

    name: str
    max_abs: float
    scale: float  # max |reference output| of the layer


@dataclass
class LayerwiseOutcome:
    reference: torch.Tensor  # float32 logits of base + adapter
    merged: torch.Tensor  # float32 logits of the merged folder
    layers: list[LayerDifference] = field(default_factory=list)


def layerwise_logits(
    merged_dir: Path, base_dir: Path, plan: AdapterPlan, input_ids: torch.Tensor, trust_remote_code: bool = False
) -> LayerwiseOutcome:
    """Logits of base + adapter and of the merged folder on `input_ids`, computed one layer at a time."""
    import torch

    if plan.unsupported or plan.fan_in_fan_out:
        raise LayerwiseUnsupported("the adapter has options the layer-by-layer check does not compute")
    model = meta_model(merged_dir, trust_remote_code)
    states = list(model.state_dict(keep_vars=True))
    ties = tie_candidates(model)
    reference = Side(ShardTensors(base_dir), ties, states, plan)
    merged = Side(ShardTensors(merged_dir), ties, states, None)
    outcome = LayerwiseOutcome(reference=torch.empty(0), merged=torch.empty(0))
    wrap_model(model, states, [reference, merged], input_ids.shape[0], outcome.layers)
    doubled = torch.cat([input_ids, input_ids])
    try:
        with torch.no_grad():
            logits = model(input_ids=doubled, use_cache=False).logits.float()
    except (RuntimeError, TypeError, ValueError, AttributeError, IndexError, KeyError, NotImplementedError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LayerwiseUnsupported(f"the layer-by-layer run failed ({first[:200]})") from exc
    outcome.reference, outcome.merged = logits[: len(input_ids)], logits[len(input_ids) :]
    return outcome


def meta_model(folder: Path, trust_remote_code: bool) -> Any:
    """The folder's model class without weights; its non-persistent buffers (rotary frequencies, embedding scale)
    computed on the CPU the way transformers' own loading computes them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)
    model.eval()
    owners = {}
    for key, buffer in model.named_non_persistent_buffers():
        owner_name, _, leaf = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner._buffers[leaf] = torch.full_like(buffer, float("nan"), device="cpu")
        owners[owner_name] = owner
    with torch.no_grad():
        for owner in owners.values():
            model._init_weights(owner)
    for key, buffer in model.named_buffers():
        if buffer.is_meta or (buffer.is_floating_point() and bool(buffer.isnan().any())):
            raise LayerwiseUnsupported(f"buffer '{key}' of {type(model).__name__} is not rebuilt by its class")
    return model


def tie_candidates(model: Any) -> dict[str, str]:
    """Output weight -> the tensor it may be tied to ({"lm_head.weight": "model.embed_tokens.weight"})."""
    ties = getattr(type(model), "_tied_weights_keys", None)
    return dict(ties) if isinstance(ties, dict) else {}


class Side:
    """One of the two models compared: where its tensors come from and, for the reference, its LoRA path."""

    def __init__(self, source: ShardTensors, ties: dict[str, str], states: list[str], plan: AdapterPlan | None):
        self.source = source
        self.name = "merged" if plan is None else "base + adapter"
        self.updates: dict[str, LoraUpdate] = {}
        self.replacements: dict[str, torch.Tensor] = {}
        if plan is not None:
            try:
                weights = match_names([f"{m}.weight" for m in plan.updates], states, "LoRA target")
                replaced = match_names(list(plan.replacements), states, "modules_to_save tensor")
            except WeightsError as exc:
                raise LayerwiseUnsupported(str(exc)) from None
            self.updates = {weights[f"{m}.weight"]: u for m, u in plan.updates.items()}
            self.replacements = {state: plan.replacements[name] for name, state in replaced.items()}
        self.aliases: dict[str, str] = {}
        for state in states:
            if state in source or state in self.replacements:
                continue
            if ties.get(state) in source:
                self.aliases[state] = ties[state]
            else:
                raise LayerwiseUnsupported(f"'{state}' has no tensor in {source.folder}")

    def stored(self, state: str) -> str:
        return self.aliases.get(state, state)

    def tensor(self, state: str) -> torch.Tensor:
        if state in self.replacements:
            return self.replacements[state].float()
        return self.source.read(self.stored(state))

    @contextmanager
    def loaded(self, module: Any, prefix: str, keys: list[str]) -> Iterator[None]:
        """The module's tensors of this side in place of its meta ones, and the LoRA path hooked beside the
        adapted linear layers (reference only); the meta tensors come back afterwards, freeing the memory."""
        import torch

        saved, hooks = [], []
        try:
            for key in keys:
                owner_name, _, leaf = key.rpartition(".")
                owner = module.get_submodule(owner_name)
                store = owner._parameters if leaf in owner._parameters else owner._buffers
                saved.append((store, leaf, store[leaf]))
                tensor = self.tensor(f"{prefix}{key}")
                store[leaf] = torch.nn.Parameter(tensor, requires_grad=False) if store is owner._parameters else tensor
            for sub_name, sub in module.named_modules():
                update = self.updates.get(f"{prefix}{sub_name}.weight" if sub_name else f"{prefix}weight")
                if update is not None and not update.embedding:
                    hooks.append(sub.register_forward_hook(lora_hook(update)))
            yield
        finally:
            for hook in hooks:
                hook.remove()
            for store, leaf, meta in saved:
                store[leaf] = meta

    def embedding_rows(self, state: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the input embedding, with the reference's embedding LoRA added as peft adds it."""
        if state in self.replacements:
            rows = self.replacements[state][ids].float()
        else:
            rows = self.source.rows(self.stored(state), ids)
        update = self.updates.get(state)
        if update is not None:
            if not update.embedding:
                raise LayerwiseUnsupported(f"a linear LoRA update on the embedding '{state}'")
            # peft's Embedding: F.embedding(x, A.T) @ B.T * s
            rows = rows + (update.A.float()[:, ids].T @ update.B.float().T) * update.scale
        return rows

    def output_logits(self, state: str, hidden: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """hidden @ W.T (+ bias), W read in row blocks; for the reference with its LoRA path beside it."""
        import torch

        update = self.updates.get(state)
        if update is not None and update.embedding:
            raise LayerwiseUnsupported(f"an embedding LoRA update on the output layer '{state}'")
        if state in self.replacements:
            blocks: Any = [(0, self.replacements[state].float())]
            rows = self.replacements[state].shape[0]
        else:
            blocks = self.source.row_blocks(self.stored(state))
            rows = self.source.shape(self.stored(state))[0]
        logits = torch.empty((*hidden.shape[:-1], rows), dtype=torch.float32)
        for start, block in blocks:
            end = start + block.shape[0]
            out = hidden @ block.T
            if update is not None:
                out = lora_output(hidden, out, block, update, slice(start, end))
            logits[..., start:end] = out
            del block, out
        return logits if bias is None else logits + bias


def lora_hook(update: LoraUpdate) -> Callable[..., Any]:
    """A forward hook that adds the LoRA path beside a linear layer (peft's LoRA / DoRA Linear forward)."""

    def hook(module: Any, args: tuple[Any, ...], output: Any) -> Any:
        base = output if module.bias is None else output - module.bias
        out = lora_output(args[0], base, module.weight, update, slice(None))
        return out if module.bias is None else out + module.bias

    return hook


def lora_output(
    x: torch.Tensor, base: torch.Tensor, weight: torch.Tensor, update: LoraUpdate, rows: slice
) -> torch.Tensor:
    """W x (given as `base`, without the layer's bias) plus the LoRA path, for the output rows `rows` of `weight`.

    LoRA: W x + s * (B (A x) + b_B). DoRA (peft's DoraLinearLayer): m / ||W + s B A||_row * (W x + s B (A x)); the
    product B A is formed only for that norm, as peft forms it.
    """
    import torch

    A, B = update.A.float(), update.B.float()[rows]
    path = (x.float() @ A.T) @ B.T
    if update.bias is not None:
        path = path + update.bias.float()[rows]
    out = base + path * update.scale
    if update.magnitude is not None:
        norm = torch.linalg.norm(weight.float() + update.scale * (B @ A), dim=1)
        out = out * (update.magnitude.float()[rows] / norm)
    return out


# --- wiring the model class to the two sides ----------------------------------------------------------------------


def decoder_layers(model: Any) -> tuple[str, Any]:
    """The ModuleList of decoder layers: the one with num_hidden_layers entries."""
    import torch

    count = model.config.get_text_config().num_hidden_layers
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) == count
    ]
    if len(found) != 1:
        raise LayerwiseUnsupported(f"{type(model).__name__}: cannot tell its decoder layers apart")
    return found[0]


def wrap_model(model: Any, states: list[str], sides: list[Side], n: int, layers: list[LayerDifference]) -> None:
    """Replace the forward of the embedding, each decoder layer, the output layer and every other module that holds
    tensors by one that loads them per side, runs both sides and keeps each side's half of the batch."""
    import torch

    names = {id(module): name for name, module in model.named_modules()}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embed, torch.nn.Embedding) or not isinstance(head, torch.nn.Linear):
        raise LayerwiseUnsupported(f"{type(model).__name__}: its embedding or output layer is not a plain one")
    embed_name, head_name = names[id(embed)], names[id(head)]
    list_name, layer_list = decoder_layers(model)
    for index, layer in enumerate(layer_list):
        prefix = f"{list_name}.{index}."
        wrap_module(layer, prefix, _keys(states, prefix), sides, n, layers)
    embed.forward = embedding_forward(embed, f"{embed_name}.weight", sides, n)
    head.forward = output_forward(head, f"{head_name}.", sides, n)
    covered = (f"{list_name}.", f"{embed_name}.", f"{head_name}.")
    for owner in sorted({s.rpartition(".")[0] for s in states if not s.startswith(covered)}):
        if any(other.startswith(f"{owner}.") for other in covered) or not owner:
            raise LayerwiseUnsupported(f"'{owner or 'the model'}' holds tensors around its decoder layers")
        wrap_module(model.get_submodule(owner), f"{owner}.", _keys(states, f"{owner}."), sides, n, None)
    for side in sides:
        for state in side.updates:
            inside = state.startswith(f"{list_name}.") or state in (f"{embed_name}.weight", f"{head_name}.weight")
            if not inside:
                raise LayerwiseUnsupported(f"LoRA on '{state}', outside the decoder layers")


def _keys(states: list[str], prefix: str) -> list[str]:
    return [s.removeprefix(prefix) for s in states if s.startswith(prefix)]


def wrap_module(
    module: Any, prefix: str, keys: list[str], sides: list[Side], n: int, layers: list[LayerDifference] | None
) -> None:
    original = type(module).forward.__get__(module)

    def forward(hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        outputs = []
        for side in sides:
            with side.loaded(module, prefix, keys):
                outputs.append(original(hidden_states, *args, **kwargs))
        reference, merged = (_first(out) for out in outputs)
        if layers is not None:
            layers.append(
                LayerDifference(
                    name=prefix.rstrip("."),
                    max_abs=float((merged[:n] - reference[:n]).abs().max()),
                    scale=float(reference[:n].abs().max()),
                )
            )
        return _combine(outputs, n)

    module.forward = forward


def embedding_forward(embed: Any, state: str, sides: list[Side], n: int) -> Callable[..., Any]:
    """The embedding looked up in a table of only the rows the inputs use, with the module's own forward (which
    may scale it, as Gemma's does)."""
    import torch

    original = type(embed).forward.__get__(embed)

    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(input_ids, return_inverse=True)
        outputs = []
        padding, embed.padding_idx = embed.padding_idx, None  # the table is indexed by position in `unique`
        try:
            for side in sides:
                table = side.embedding_rows(state, unique)
                saved, embed._parameters["weight"] = embed._parameters["weight"], torch.nn.Parameter(table, False)
                try:
                    outputs.append(original(inverse))
                finally:
                    embed._parameters["weight"] = saved
        finally:
            embed.padding_idx = padding
        return _combine(outputs, n)

    return forward


def output_forward(head: Any, prefix: str, sides: list[Side], n: int) -> Callable[..., Any]:
    def forward(hidden: torch.Tensor) -> torch.Tensor:
        outputs = []
        for side in sides:
            bias = side.tensor(f"{prefix}bias") if head.bias is not None else None
            outputs.append(side.output_logits(f"{prefix}weight", hidden.float(), bias))
        return _combine(outputs, n)

    return forward


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _combine(outputs: list[Any], n: int) -> Any:
    """The reference's first half of the batch and the merged model's second half (tuples: in the first item)."""
    import torch

    reference, merged = outputs
    combined = torch.cat([_first(reference)[:n], _first(merged)[n:]])
    return (combined, *merged[1:]) if isinstance(merged, tuple) else combined
