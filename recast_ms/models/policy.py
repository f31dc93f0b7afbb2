"""The policy interface the trainer uses: per-token log-probs of given sequences, and next-token logits.

Inputs follow :mod:`recast_ms.models.qwen3`'s convention: ``input_ids [B, S]`` int32, ``S == seq_length``,
right-padded with the dedicated pad id. Both cells run in graph mode; every new batch size compiles anew,
so callers should keep batch sizes to a few fixed buckets.
"""
import copy

import mindspore as ms
from mindspore import nn, ops


def _eval_only(model):
    """Put a MindFormers model in eval mode: in train mode it returns the LM loss (and needs labels) instead
    of logits. Dropout is off either way (HF Qwen3 has none), so gradients are unaffected."""
    model.set_train(False)
    return model


def set_dropout(model, active: bool) -> int:
    """Switch the CPU dropout cells of ``model`` (``cpu_compat.CpuDropout``) on or off; returns how many carry a
    non-zero probability. Set it before a graph's first call: a compiled graph keeps the value it was compiled
    with (SFT: on for its training step, off for its validation loss)."""
    count = 0
    for _, cell in model.cells_and_names():
        if getattr(cell, "cpu_dropout", False):
            cell.active = bool(active)
            count += int(cell.use_dropout)
    return count


class _OverModel(nn.Cell):
    """A cell over a MindFormers model that keeps the model in eval mode whatever its parents set."""

    def __init__(self, model):
        # auto_prefix=False: the model's parameter names stay as built (checkpoint names, "ref." of freeze_copy)
        super().__init__(auto_prefix=False)
        self.model = _eval_only(model)

    def add_flags_recursive(self, **flags):
        # set_train() of any enclosing cell (e.g. the trainer's loss cell) arrives here
        super().add_flags_recursive(**flags)
        if "training" in flags:
            _eval_only(self.model)
        return self


class TokenLogProbs(_OverModel):
    r"""Log-probabilities of each next token: ``logps[b, t] = log p(input_ids[b, t+1] | input_ids[b, :t+1])``.

    Args:
        model (nn.Cell): MindFormers' training-graph Qwen3 (returns logits ``[B*S, V]`` in eval mode).
        temperature (float): logits are divided by it before the softmax (match the sampling temperature).

    Inputs:
        - **input_ids** (Tensor) - int32 ``[B, S]``, right-padded.

    Outputs:
        Tensor of float32 ``[B, S-1]``; entries whose target is padding are meaningless (mask them).

    Examples:
        >>> logps = TokenLogProbs(model)(ms.Tensor(input_ids))  # [B, S-1]
    """

    def __init__(self, model, temperature: float = 1.0):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        super().__init__(model)
        self.inv_temperature = 1.0 / float(temperature)

    def construct(self, input_ids):
        bsz, seq = input_ids.shape
        logits = self.model(input_ids)  # [B*S, V]
        if self.inv_temperature != 1.0:
            logits = logits * self.inv_temperature
        logp = ops.log_softmax(logits, -1)  # [B*S, V]
        # the target of position t is token t+1; the last position's target is a dummy (its own token)
        targets = ops.concat((input_ids[:, 1:], input_ids[:, -1:]), 1)  # [B, S]
        # a 2-D gather_elements on [B*S, V] is ~6x faster on CPU than the 3-D form
        picked = ops.gather_elements(logp, 1, ops.reshape(targets, (bsz * seq, 1)))  # [B*S, 1]
        return ops.reshape(picked, (bsz, seq))[:, :-1]  # [B, S-1]


class ResponseLogProbs(_OverModel):
    r"""Log-probabilities of the ``R`` response tokens only: the output layer and the log-softmax run on the
    ``B*R`` positions that predict response tokens, not on all ``B*S`` (TRL's ``logits_to_keep``).

    MindFormers' model is used as it is: its ``language_model`` gives the final hidden states ``[S, B, H]``
    (final norm included), the positions are gathered from that layout (no transpose), then its own
    ``output_layer`` (tied or not) makes ``[B*R, V]`` logits. At V = 151,936 the full head is ~3.7 GB of
    logits per 128-row micro-batch; this keeps ``R/S`` of it. Equal to :class:`TokenLogProbs` at the same
    positions (tested to 1e-6).

    Args:
        model (nn.Cell): MindFormers' training-graph Qwen3.
        response_len (int): ``R``, the static number of response positions per row.
        temperature (float): logits are divided by it before the softmax.

    Inputs:
        - **input_ids** (Tensor) - int32 ``[B, S]``, right-padded; row b's response starts at ``resp_start[b]``.
        - **resp_start** (Tensor) - int32 ``[B]``, the prompt length, in ``[1, S-R]``.

    Outputs:
        Tensor of float32 ``[B, R]``: ``logps[b, j] = log p(x[b, s_b+j] | x[b, :s_b+j])``, ``s_b = resp_start[b]``;
        entries whose token is padding are meaningless (mask them).
    """

    def __init__(self, model, response_len: int, temperature: float = 1.0):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if response_len < 1:
            raise ValueError(f"response_len must be >= 1, got {response_len}")
        super().__init__(model)
        self.response_len = int(response_len)
        self.inv_temperature = 1.0 / float(temperature)
        gpt = model.model
        self.tied = bool(gpt.share_embeddings_and_output_weights)
        self.offsets = ms.Tensor(list(range(self.response_len)), ms.int32)  # [R]

    def construct(self, input_ids, resp_start):
        gpt = self.model.model
        bsz, seq = input_ids.shape
        _, attention_mask, _, _, _ = gpt.preprocess_labels_and_masks(input_ids, None, None, None)
        hidden, _, _, _ = gpt.language_model(input_ids, None, attention_mask, None)  # [S, B, H]
        pos = ops.reshape(resp_start, (-1, 1)) + ops.reshape(self.offsets, (1, -1))  # [B, R] target positions
        batch = ops.reshape(ops.arange(bsz, dtype=ms.int32), (-1, 1))  # [B, 1]
        # the hidden state at position t predicts token t+1; [S, B, H] flattens to row t*B + b
        picked = ops.gather(ops.reshape(hidden, (seq * bsz, -1)), ops.reshape((pos - 1) * bsz + batch, (-1,)), 0)
        weight = gpt.shared_embedding_or_output_weight() if self.tied else None
        logits, _ = gpt.output_layer(picked, weight)  # [B*R, V]
        logits = ops.cast(logits, ms.float32)
        if self.inv_temperature != 1.0:
            logits = logits * self.inv_temperature
        logp = ops.log_softmax(logits, -1)  # [B*R, V]
        targets = ops.gather(ops.reshape(input_ids, (-1,)), ops.reshape(batch * seq + pos, (-1,)), 0)  # [B*R]
        picked_logp = ops.gather_elements(logp, 1, ops.reshape(targets, (-1, 1)))  # [B*R, 1]
        return ops.reshape(picked_logp, (bsz, self.response_len))  # [B, R]


class LogitsAt(_OverModel):
    r"""Logits of the next token after position ``positions[b]`` of each row (e.g. the last prompt token).

    Inputs:
        - **input_ids** (Tensor) - int32 ``[B, S]``, right-padded.
        - **positions** (Tensor) - int32 ``[B]``, each in ``[0, S)``.

    Outputs:
        Tensor of float32 ``[B, V]``.
    """

    def construct(self, input_ids, positions):
        bsz, seq = input_ids.shape
        logits = self.model(input_ids)  # [B*S, V]
        rows = ops.arange(bsz, dtype=ms.int32) * seq + ops.cast(positions, ms.int32)  # [B]
        return ops.gather(logits, rows, 0)  # [B, V]


class Policy:
    """A Qwen3 policy: ``logps(input_ids)`` and ``logits_at(input_ids, positions)`` over one model.

    ``trainable_params()`` are the model's; a loss cell for the trainer wraps ``self.token_logps``.
    """

    def __init__(self, model, temperature: float = 1.0):
        self.model = model
        self.token_logps = TokenLogProbs(model, temperature)
        self.next_logits = LogitsAt(model)

    def logps(self, input_ids):
        """``[B, S-1]`` log-probs of tokens 1..S-1 given their prefixes."""
        return self.token_logps(ms.Tensor(input_ids, ms.int32))

    def logits_at(self, input_ids, positions):
        """``[B, V]`` logits after ``positions[b]`` in row b."""
        return self.next_logits(ms.Tensor(input_ids, ms.int32), ms.Tensor(positions, ms.int32))

    def trainable_params(self):
        return self.model.trainable_params()


def freeze_copy(model, name_prefix: str = "ref."):
    """A frozen copy of a MindFormers Qwen3 with the same weights (the reference policy).

    A new model is built from ``model.config`` (the CPU patches must still be applied on CPU), its parameters
    take copies of ``model``'s values, ``requires_grad`` is False, and their names get ``name_prefix`` so
    the two models can sit in one graph without parameter-name clashes.
    """
    from mindspore.nn.utils import no_init_parameters  # pylint: disable=import-outside-toplevel

    # no_init_parameters: the copy's random initial weights are never materialised (they would be
    # overwritten at once); building with them cost 4.3x the parameter bytes at the Qwen3-0.6B shape, this 1x
    with no_init_parameters():
        frozen = type(model)(copy.deepcopy(model.config))
    source = dict(model.parameters_and_names())
    for name, param in frozen.parameters_and_names():
        if name not in source:
            raise RuntimeError(f"freeze_copy: parameter {name} has no counterpart in the source model")
        param.set_data(ms.Tensor(source[name].asnumpy()))
        param.requires_grad = False
        param.name = name_prefix + param.name
    return _eval_only(frozen)
