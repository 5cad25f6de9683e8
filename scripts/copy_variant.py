"""`hnae train` with the small hnae preset changed, for experiments on how fast copy is learned.

    FIRST=32 WIN=32 AGE=zero python scripts/copy_variant.py --task copy --seq-len 1000 --curriculum ...

Environment switches (unset: the preset as it is):
    FIRST   level-0 window (the preset's 128)     WIN   window of the levels above (8)
    SLOTS   summary slots (8)                   WIDTH  body width (default: the one nearest 40k parameters)
    DEPTH   hnae layers (2)
    HEADS   attention heads (default: the most that leave heads >= 16 wide; 2 at width 40)
    PLACE_RANK  the small preset's place_rank (8): an int, or "full" for full place tables
    AGE=zero   summary age embeddings (keys and values) fixed at zero: summaries are told apart
               by content only
    POOL=dev   a summary pools each slot's deviation from its block's mean value (place values
               included) instead of the weighted values themselves
    POOL=compete  slots compete for items (slot attention): each item's weights are a softmax over
               the slots, then each slot's weights are renormalised over the items
    POOL=linear  each slot is a learned linear mix of the block's values (place values included),
               weights per head, slot and place, not an attention: a strided convolution over the
               block, like the compressive transformer's convolutional compression; the mix starts
               random (std LINEAR_STD / sqrt(n), default 1), so slots tell places apart from step 0
    SUMMARY_POOL  the small preset's summary_pool ("attention"; "select": see hnae.pooling)
    LOCAL_DROP=p  in training, each query row (of every stream and head alike) loses its local window
               with probability p, keeping only its own position: it must read the summaries, so
               the gradient of reading them never vanishes where the local window wins the softmax
    PLACE=zero the block's place embedding (added to every layer's input at t mod w_0) fixed at
               zero: nothing tells a step where it sits in its level-0 block
    PLACE=shift in training, each sequence reads the place embedding at (t + r) mod w_0 with its
               own random r (one draw per layer and call): places keep their differences but
               no longer tell where a block starts (evaluation reads it unshifted)
    POOL_PLACE=s  the pools' place keys start s times larger (std 0.02 * s): slots tell places apart
               from the first step instead of pooling a bag of the block's contents
    POOL_QUERY=s  the pools' slot queries start s times larger (std 0.5 * s): sharper pooling
    POOL_LR=m  the pools' slot queries and place tables train at m times the learning rate
               (the same start; the slots can sharpen m times faster)
    RECON=w    an auxiliary loss (weight w) that trains the level-1 pools to keep each place of a block:
               learned per-place decoder queries attend over the summary's keys and values and must
               give back each item's value; it reaches only the pools and the decoder queries (the
               items and the layer's key/value projection are detached), like the compressive
               transformer's reconstruction loss
The arguments are those of `hnae train`, or `evaluate` and those of `hnae evaluate` (set the same
switches). Nothing here changes the library or the bench defaults.
"""
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from hnae import attention, block, kernels, pooling
from hnae import model as hnae_model
from hnae.places import place_table
from hnae_bench import models, train, train_cli

for switch, table in (("FIRST", models.HNAE_FIRST_WINDOW), ("WIN", models.HNAE_WINDOWS),
                      ("SLOTS", models.HNAE_SLOTS), ("DEPTH", models.HNAE_DEPTH)):
    if switch in os.environ:
        table["small"] = int(os.environ[switch])

if "HEADS" in os.environ:
    models.HNAE_HEADS["small"] = int(os.environ["HEADS"])

if "WIDTH" in os.environ:  # a fixed body width instead of the one that meets the parameter target
    models.fit_width = lambda *args, **kwargs: int(os.environ["WIDTH"])

if "SUMMARY_POOL" in os.environ:
    models.HNAE_POOL["small"] = os.environ["SUMMARY_POOL"]

if "PLACE_RANK" in os.environ:  # the preset's place-table rank; "full": full tables
    value = os.environ["PLACE_RANK"]
    models.HNAE_PLACE_RANK["small"] = None if value == "full" else int(value)

if os.environ.get("AGE") == "zero":
    original_init = attention.HierarchicalAttention.__init__

    def init_without_ages(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        for parameter in [*self.age_keys, *self.age_values]:  # (H, w_l, E) each
            parameter.data.zero_()
            parameter.requires_grad_(False)
    attention.HierarchicalAttention.__init__ = init_without_ages

if os.environ.get("PLACE") == "zero":
    original_block_init = block.HNAEBlock.__init__

    def init_without_place(self, *args, **kwargs):
        original_block_init(self, *args, **kwargs)
        for name in ("place_embedding", "place_embedding_columns"):  # full (w_0, D) or factored
            if name in self._parameters:
                self._parameters[name].data.zero_()
                self._parameters[name].requires_grad_(False)
    block.HNAEBlock.__init__ = init_without_place

if os.environ.get("PLACE") == "shift":
    original_forward = hnae_model.HNAE.forward

    def forward_with_shifts(self, input, state=None, lengths=None):
        for (layer,) in self.layers:  # one random phase per sequence and layer for this call
            width = layer.attention.windows[0]
            batch = input.shape[0] if self.batch_first else input.shape[1]
            layer.place_shift = torch.randint(width, (batch, 1), device=input.device) if self.training else None
        return original_forward(self, input, state, lengths)

    def shifted_forward_chunk(self, x, state, start, end):
        place_embedding = place_table(self, "place_embedding")  # (w_0, D)
        width = place_embedding.shape[0]
        places = torch.arange(start, start + x.shape[1], device=x.device)  # (C,)
        shift = getattr(self, "place_shift", None)
        places = (places + shift) % width if shift is not None else places % width  # (B, C) or (C,)
        hidden = self.project_in(x) + place_embedding[places]  # (B, C, D)
        attended, new_state = self.attention.forward_chunk(self.norm_attention(hidden), state, start, end)
        hidden = hidden + attended
        hidden = hidden + self.feed_forward(self.norm_feed_forward(hidden))
        return self.project_out(self.norm_output(hidden)), new_state
    hnae_model.HNAE.forward = forward_with_shifts
    block.HNAEBlock.forward_chunk = shifted_forward_chunk

if os.environ.get("POOL") == "compete":
    def attend_competing(queries, keys, values, mask=None):
        """queries (B*H, M, K, E), keys and values (B*H, M, n, E) -> (B*H, M, K, E)."""
        logits = torch.matmul(queries, keys.transpose(-1, -2)) * queries.shape[-1] ** -0.5  # (B*H, M, K, n)
        weights = logits.softmax(dim=-2)  # each item split over the slots
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-6)  # each slot: a mean of its share
        return torch.matmul(weights, values)
    pooling.attend = attend_competing

if os.environ.get("POOL") == "linear":
    original_linear_init = pooling.AttentionPool.__init__

    def init_with_mix(self, d_model, num_heads, items_per_block, slots, *args, **kwargs):
        original_linear_init(self, d_model, num_heads, items_per_block, slots, *args, **kwargs)
        scale = float(os.environ.get("LINEAR_STD", "1")) / items_per_block ** 0.5
        self.mix = nn.Parameter(torch.randn(num_heads, slots, items_per_block) * scale)  # (H, K, n)
    pooling.AttentionPool.__init__ = init_with_mix

    def pool_linearly(self, keys, values):
        """values (B, H, M, n, E) -> summaries (B, M, K, D); keys unused."""
        batch, heads, blocks, items, width = values.shape
        values = values + place_table(self, "place_values").unsqueeze(1)  # (B, H, M, n, E)
        pooled = torch.einsum("hkn,bhmne->bmkhe", self.mix, values)  # (B, M, K, H, E)
        return self.norm(self.output(pooled.reshape(batch, blocks, self.slots, heads * width)))
    pooling.AttentionPool.forward = pool_linearly

if "LOCAL_DROP" in os.environ:
    original_attend = attention.attend

    def attend_with_local_drop(queries, keys, values, mask=None):
        """The layer's attention; in training, rows of the shared mask (1, Q, R, S) lose their local keys."""
        rows = queries.shape[-2]  # R = w_0 (the default query_rows); with 2+ query blocks the local keys are the first 2 R
        if torch.is_grad_enabled() and mask is not None and mask.dim() == 4 and mask.shape[0] == 1 and mask.shape[1] > 1:
            drop = torch.rand(mask.shape[1], rows, 1, device=mask.device) < float(os.environ["LOCAL_DROP"])
            own = torch.zeros(rows, 2 * rows, dtype=torch.bool, device=mask.device)
            own[torch.arange(rows), torch.arange(rows) + rows] = True  # key j = i + w_0: the query itself
            local = mask[0, :, :, :2 * rows]  # (Q, R, 2R)
            mask = torch.cat([torch.where(drop, own & local, local), mask[0, :, :, 2 * rows:]], dim=-1).unsqueeze(0)
        return original_attend(queries, keys, values, mask)
    attention.attend = attend_with_local_drop

if os.environ.get("POOL") == "dev":
    def attend_minus_mean(queries, keys, values, mask=None):
        """The pool's attention less its block's mean value: values (B*H, M, n, E) -> (B*H, M, K, E)."""
        return kernels.attend(queries, keys, values, mask) - values.mean(dim=2, keepdim=True)
    pooling.attend = attend_minus_mean  # the pool's values already carry the place values

if "POOL_PLACE" in os.environ:
    original_pool_init = pooling.AttentionPool.__init__

    def init_with_larger_places(self, *args, **kwargs):
        original_pool_init(self, *args, **kwargs)
        for name in ("place_keys", "place_keys_columns"):  # full (H, n, E) or factored
            if name in self._parameters:
                self._parameters[name].data.mul_(float(os.environ["POOL_PLACE"]))
    pooling.AttentionPool.__init__ = init_with_larger_places

if "POOL_QUERY" in os.environ:
    original_query_init = pooling.AttentionPool.__init__

    def init_with_larger_queries(self, *args, **kwargs):
        original_query_init(self, *args, **kwargs)
        self.queries.data.mul_(float(os.environ["POOL_QUERY"]))
    pooling.AttentionPool.__init__ = init_with_larger_queries

if "POOL_LR" in os.environ:
    original_trainer_init = train.Trainer.__init__

    def init_with_faster_pools(self, *args, **kwargs):
        original_trainer_init(self, *args, **kwargs)
        if self.step:
            raise SystemExit("POOL_LR: resuming is not supported")
        def sharpens(name):  # a pool's slot queries and place keys and values
            return ".pools." in name and (name.endswith(".queries") or ".place_" in name)
        pooled = [p for n, p in self.model.named_parameters() if sharpens(n)]
        others = [p for n, p in self.model.named_parameters() if not sharpens(n)]
        lr = self.config.lr
        self.optimizer = torch.optim.Adam([{"params": others, "lr": lr},
                                           {"params": pooled, "lr": lr * float(os.environ["POOL_LR"])}])
    train.Trainer.__init__ = init_with_faster_pools

if "RECON" in os.environ:
    reconstruction_losses = []  # this forward's per-layer losses, summed into the training loss
    original_pool_init_r = pooling.AttentionPool.__init__

    def init_with_decoder(self, d_model, num_heads, items_per_block, *args, **kwargs):
        original_pool_init_r(self, d_model, num_heads, items_per_block, *args, **kwargs)
        self.decoder_queries = nn.Parameter(  # (H, n, E): one query per place of the block
            torch.randn(num_heads, items_per_block, d_model // num_heads) * 0.5)
    pooling.AttentionPool.__init__ = init_with_decoder
    original_summarise = attention.HierarchicalAttention.summarise

    def summarise_and_reconstruct(self, level, keys, values):
        result = original_summarise(self, level, keys, values)
        if level == 1 and self.training and torch.is_grad_enabled() and keys.shape[2] > 0:
            pool = self.pools[0]
            summaries = pool(keys.detach(), values.detach())  # (B, M, K, D): only the pool learns from it
            weight = self.query_key_value.weight[self.d_model:].detach()
            bias = self.query_key_value.bias
            bias = None if bias is None else bias[self.d_model:].detach()
            slot_keys, slot_values = F.linear(summaries, weight, bias).chunk(2, dim=-1)
            slot_keys = self._split_heads(slot_keys) * self.content_mask  # (B, H, M, K, E)
            slot_values = self._split_heads(slot_values)
            queries = (pool.decoder_queries * self.content_mask).unsqueeze(1).unsqueeze(0)  # (1, H, 1, n, E)
            queries = queries.expand(keys.shape[0], -1, keys.shape[2], -1, -1)  # (B, H, M, n, E)
            rebuilt = kernels.attend(queries.flatten(0, 1), slot_keys.flatten(0, 1), slot_values.flatten(0, 1))
            reconstruction_losses.append(F.mse_loss(rebuilt, values.detach().flatten(0, 1)))
        return result
    attention.HierarchicalAttention.summarise = summarise_and_reconstruct
    original_penalty = models.SequenceModel.write_penalty

    def penalty_with_reconstruction(self):
        total = original_penalty(self)
        if reconstruction_losses:
            total = total + float(os.environ["RECON"]) / train.WRITE_PENALTY_WEIGHT * sum(reconstruction_losses)
            reconstruction_losses.clear()
        return total
    models.SequenceModel.write_penalty = penalty_with_reconstruction

if __name__ == "__main__":
    if sys.argv[1:2] == ["evaluate"]:  # `hnae evaluate` on a checkpoint trained with the same switches
        from hnae_bench import evaluate_cli
        sys.exit(evaluate_cli.main(sys.argv[2:]))
    sys.exit(train_cli.main(sys.argv[1:]))
