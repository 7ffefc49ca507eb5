"""clo.py: Cross-Lingual Optimization (Lee, Hong, Moon, Lim; ACL 2025; arXiv 2505.14297), end to end.

    python clo.py --model HuggingFaceTB/SmolLM2-135M-Instruct --lang ko --out runs/ko

The paper, in code (section numbers of arXiv 2505.14297):
    Sec. 3, the data: (x_en, y_en) translated into (x_l, y_l)      translated_rows -> data.translate_items
    Sec. 3, the two preference pairs per item                       cross_lingual_pairs -> data.build_pairs
    Sec. 3, sequence log-probs log pi(y|x), summed over tokens       sequence_logps
    Sec. 3, pi_ref: the initial model, computed once                 reference_logps
    Sec. 3, the objective L = lam * NLL + (1 - lam) * L_CL           clo_loss
    Sec. 3, "batch-based": an item's pairs in one micro-batch        data.length_grouped_batches, rank_share
    Sec. 4, trained parameters: attention Q/K/V/O (or LoRA on them)  set_trainable
    Sec. 4-5, baselines and ablations: the equation, other settings  METHODS (lam and the NLL mask)
    Sec. 4, training (AdamW, warmup + cosine, accumulation)          train
    The recipe, checked first and saved last                         main"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import hashlib
import json
import math
import os
import shlex
import shutil
import time
from dataclasses import dataclass, field

import safetensors.torch  # called as safetensors.torch.save_file etc.: looked up at each call
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data as D
import model as M


# ----------------------------------------------------------------------------------------------------------------------
# Sec. 3: the CLO loss; sequence log-probs pi(y|x), summed over response tokens; pi_ref, computed once


@dataclass
class LossParts:
    loss: torch.Tensor         # what is minimised
    nll: torch.Tensor          # per-token NLL of the responses in the NLL term (0 if none in the batch)
    pair_loss: torch.Tensor    # L_CL: mean -log sigmoid(beta * margin) over the pairs
    reward_acc: torch.Tensor   # share of pairs with margin > 0
    margin: torch.Tensor       # mean beta * margin (the DPO implicit reward of chosen minus rejected)


def clo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             chosen_lengths, nll_mask, beta: float = 0.1, lam: float = 0.5, n_pairs=None,
             n_nll_tokens=None) -> LossParts:
    """The CLO objective (paper Sec. 3), over B preference pairs:

      L    = lam * NLL(y_l | x_l) + (1 - lam) * L_CL
      L_CL = -mean_pairs log sigmoid(beta * [(log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))])
      NLL  = -sum_{i in mask} log pi(y_c,i | x_i) / sum_{i in mask} |y_c,i|      (a per-token mean)

    The four *_logps (B,) are sequence log-probs, summed over response tokens (sequence_logps). L_CL runs over both
    kinds of pair (x_en: y_en > y_l and x_l: y_l > y_en). The NLL term is the chosen log-probs of the pairs in
    nll_mask (B,) 1.0/0.0 (CLO: the target-language pairs), per token: chosen_lengths (B,) are their token counts.
    n_pairs and n_nll_tokens are the means' denominators, by default this batch's; the loop passes the whole
    optimizer step's (all micro-batches and ranks), so the micro-batches' losses and gradients sum to the step's."""
    margin = beta * ((policy_chosen_logps - reference_chosen_logps)
                     - (policy_rejected_logps - reference_rejected_logps))                          # (B,)
    n_pairs = len(margin) if n_pairs is None else n_pairs
    n_nll_tokens = float((chosen_lengths * nll_mask).sum()) if n_nll_tokens is None else n_nll_tokens
    pair_loss = -F.logsigmoid(margin).sum() / n_pairs
    nll = -(policy_chosen_logps * nll_mask).sum() / max(n_nll_tokens, 1.0)
    loss = lam * nll + (1 - lam) * pair_loss
    return LossParts(loss, nll.detach(), pair_loss.detach(), (margin > 0).float().sum().detach() / n_pairs,
                     margin.sum().detach() / n_pairs)


# --method -> (lam, whose chosen answers enter the NLL term): the paper's baselines and ablations (Sec. 4-5) as settings
# of the one equation above. lam None: --lam (default 0.5); a number: fixed, --lam refused. dpo: NLL weight 0, logged.
METHODS = {"clo": (None, "target"),        # the paper's CLO: NLL on target-language answers only
           "clo-en-nll": (None, "both"),   # its ablation "target + English NLL": NLL on every chosen answer
           "sft": (1.0, "both"),           # SFT on both languages' answers
           "sft-en": (1.0, "en"),          # SFT-eng: English answers only
           "sft-target": (1.0, "target"),  # SFT-tgt: target-language answers only
           "dpo": (0.0, "target")}         # DPO: L_CL alone (SFT+DPO: dpo on an sft run's merged/)


def in_nll_term(pair, method: str) -> bool:
    """Whether a pair's chosen response enters the NLL term of --method (METHODS)."""
    nll_on = METHODS[method][1]
    return nll_on == "both" or pair.in_target_lang == (nll_on == "target")


CHOSEN, REJECTED = 0, 1  # the reference table's columns: log pi_ref(y_c|x), log pi_ref(y_r|x) (reference_logps)


def sequence_logps(model, batch, n_sequences: int):
    """Summed log pi(response | prompt) of each of the batch's sequences, and its token count: (n,), (n,). batch is
    data.collate's (input_ids, labels, positions, segments); only response positions are projected onto the vocabulary.
    Rows of one right-padded sequence need no mask (causal: nothing looks ahead); packed rows attend within each."""
    input_ids, labels, positions, segments = batch
    one_per_row = bool(((segments == segments[:, :1]) | (segments < 0)).all())
    scored = labels != -100                                                # (R, T)
    logits = model(input_ids, score_mask=scored, positions=None if one_per_row else positions,
                   segments=None if one_per_row else segments)             # (n_scored, vocab); via DDP if wrapped
    token_logp = -F.cross_entropy(logits.float(), labels[scored], reduction="none")  # (n_scored,)
    seq = segments[scored]
    sums = torch.zeros(n_sequences, device=logits.device).index_add(0, seq, token_logp)
    counts = torch.zeros(n_sequences, device=logits.device, dtype=torch.long).index_add(0, seq, torch.ones_like(seq))
    return sums, counts


@torch.no_grad()
def reference_logps(model, pairs, batch_size, pad_id, device, progress=True, dist: Dist | None = None, pack_to=None,
                    dtype="float32"):
    """log pi_ref of every chosen and rejected response, once, by the initial model before any update (no second copy
    is held); rank r scores pairs r, r + world, ..., summed across ranks. Under --dtype's autocast, so policy equals
    reference at step 0 (pair loss log 2). Returns (P, 2): [chosen, rejected], float32."""
    dist = dist or Dist()
    model.eval()
    out = torch.zeros(len(pairs), 2, device=device)
    order = sorted(range(dist.rank, len(pairs), dist.world), key=lambda i: len(pairs[i].prompt) + len(pairs[i].chosen))
    for b in tqdm(range(0, len(order), batch_size), desc="reference log-probs",
                  disable=not (progress and dist.is_main)):
        idx = order[b:b + batch_size]
        batch = [t.to(device) for t in D.collate([pairs[i] for i in idx], pad_id, pack_to)]
        with autocast(device, dtype):
            chosen, rejected = sequence_logps(model, batch, 2 * len(idx))[0].float().chunk(2)  # collate: chosen first
        out[idx, CHOSEN], out[idx, REJECTED] = chosen, rejected
    return dist.sum(out).cpu()


# ----------------------------------------------------------------------------------------------------------------------
# Sec. 4: what is trained (attention Q/K/V/O, or LoRA on them); the loop (AdamW, warmup + cosine, accumulation)

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")

def is_trained(tune: str, name: str) -> bool:
    """Whether --tune trains the checkpoint's parameter `name` itself (LoRA trains adapters beside it)."""
    return tune == "full" or (tune == "attn" and any(f".{t}." in name for t in ATTENTION_PROJECTIONS))


def set_trainable(model, tune: str, targets, r: int, alpha: float, dropout: float) -> list[str]:
    """--tune lora: fp32 LoRA adapters on `targets`; attn: the full Q/K/V/O weights (the paper's setting); full: all."""
    if tune == "lora":
        return M.apply_lora(model, targets, r, alpha, dropout, dtype=torch.float32)
    for name, p in model.named_parameters():
        p.requires_grad_(is_trained(tune, name))
    return [n for n, p in model.named_parameters() if p.requires_grad]


def lr_at(step, total, warmup, peak):
    """Linear warmup to `peak`, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def global_batches(pairs, args, dist, epoch: int) -> list[list[list[int]]]:
    """Length-grouped batches of batch_size x world groups (--pairing items: an item's pairs; pairs: one pair each),
    as pair indices; a last batch with fewer groups than ranks is dropped (all ranks take every step)."""
    batches = D.length_grouped_batches(pairs, args.batch_size * dist.world, args.seed, epoch, args.pairing == "items")
    return [b for b in batches if len(b) >= dist.world]


def rank_share(global_batch, dist) -> list[int]:
    """This rank's micro-batch of a global batch: every world-th group, whole (an item's pairs stay together)."""
    return [i for group in global_batch[dist.rank::dist.world] for i in group]


def train(args, model, pairs, tok, ref, run: Run) -> dict:
    """nanoGPT's loop: learning rate, micro-batches (forward, loss, backward), clip, step, log, checkpoint. A step =
    --grad-accum micro-batches of --batch-size x world items (or pairs: --pairing), whatever the number of ranks.
    Returns the last metrics line; after --stop-after's step (a checkpoint: Checkpoints) with "stopped": True."""
    dist, device = run.dist, run.device
    plan = global_batches(pairs, args, dist, 0)
    total = args.max_steps or math.ceil(len(plan) / args.grad_accum) * args.epochs
    warmup = int(args.warmup * total) if args.warmup < 1 else int(args.warmup)
    engine = wrap_for_training(model, args, dist)  # before the optimizer: FSDP replaces the parameters
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    checkpoints = Checkpoints(args, run, model, optimizer, total)
    step, done = checkpoints.restore()                      # (0, 0) unless --resume found a checkpoint
    log_step = StepLog(args, run, step, total, len(plan))   # metrics.jsonl and the progress bar
    model.train()
    epoch, batches, last = None, [], {}
    while step < total:
        if done // len(plan) != epoch:                      # a new epoch: its shuffled batch order
            epoch = done // len(plan)
            batches = global_batches(pairs, args, dist, epoch)
        micro = batches[done % len(plan):][:args.grad_accum]
        # Sec. 3's means run over the whole step's pairs and NLL tokens, however split into micro-batches and ranks
        in_step = [pairs[i] for global_batch in micro for group in global_batch for i in group]
        n_nll_tokens = float(sum(len(p.chosen) for p in in_step if in_nll_term(p, args.method)))
        optimizer.zero_grad(set_to_none=True)
        shares = torch.zeros(5, device=device)              # loss, nll, pair loss, reward acc, margin: this rank's
        for k, global_batch in enumerate(micro):
            idx = rank_share(global_batch, dist)
            batch = [t.to(device) for t in D.collate([pairs[i] for i in idx], tok.pad_id, args.pack_to)]
            chosen_lengths = torch.tensor([float(len(pairs[i].chosen)) for i in idx], device=device)
            nll_mask = torch.tensor([float(in_nll_term(pairs[i], args.method)) for i in idx], device=device)
            sync = engine is model or k == len(micro) - 1  # DDP all-reduces gradients on the last micro-batch only
            with (contextlib.nullcontext() if sync else engine.no_sync()), autocast(device, args.dtype):
                chosen, rejected = sequence_logps(engine, batch, 2 * len(idx))[0].chunk(2)  # collate: chosen first
                r = ref[idx].to(device)                     # (B, 2)
                parts = clo_loss(chosen, rejected, r[:, CHOSEN], r[:, REJECTED], chosen_lengths, nll_mask,
                                 args.beta, args.lam, n_pairs=len(in_step), n_nll_tokens=n_nll_tokens)
                (parts.loss * dist.world).backward()        # DDP/FSDP average over ranks: x world makes it their sum
            stop_if_not_finite(parts, step, checkpoints.folder)
            shares += torch.stack([parts.loss.detach(), parts.nll, parts.pair_loss, parts.reward_acc,
                                   parts.margin]).float()
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)).item()
        lr = lr_at(step, total, warmup, args.lr)
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.step()
        step, done = step + 1, done + len(micro)
        last = log_step(step, done, dist.sum(shares), in_step, lr, grad_norm)
        if checkpoints.after_step(step, done):              # saves when due; True after --stop-after's step
            break
    log_step.bar.close()
    return {**last, "stopped": True} if step < total else last


# ----------------------------------------------------------------------------------------------------------------------
# The recipe: main() is the paper's pipeline top to bottom, checked first, saved last; each step is one function


def main(argv=None):
    args = parse_args(argv)                                  # flags and files checked: nothing loaded, nothing written
    items, rows = read_data(args)                            # (x_en, y_en), and --translations' (x_l, y_l)
    run = check_run_folder(args, items)                      # ranks; --resume: a changed setting is refused now
    if run.finished is not None:
        return finish(run, run.finished)
    model, tok = load_policy(args, run)                      # pi_theta; before any update it is also pi_ref
    claim_run_folder(args, run)                              # a new run: what an earlier one left goes; args.json
    rows = rows or translated_rows(args, items, run)         # + (x_l, y_l) by the MT model
    pairs = cross_lingual_pairs(args, rows, run)             # x_en: y_en > y_l and x_l: y_l > y_en
    tokenized, report = D.tokenize_pairs(pairs, tok, args.max_len)  # token ids, each response cut to --max-len
    record_pairs(args, run, tokenized, report, tok)          # said; none left, or other pairs on --resume: refused
    ref = reference_table(args, model, tokenized, tok, run)  # log pi_ref(y|x) of every response, once
    wrapped = set_trainable(model, args.tune, args.lora_targets, args.lora_r, args.lora_alpha, args.lora_dropout)
    say_training(args, model, wrapped, tokenized, run)
    last = train(args, model, tokenized, tok, ref, run)
    if not last.get("stopped"):                              # --stop-after: a checkpoint, no outputs yet
        save_outputs(args, model, last, run)                 # adapter, merged checkpoint, summary.json
    return finish(run, last)


def translated_rows(args, items, run: Run) -> list[dict]:
    """One row per item (en_*, <lang>_* fields), translated by rank 0 into the run's resumable cache; others read it."""
    cache, load = os.path.join(run.out, "translations.jsonl"), lambda: load_translator(args, run)
    rows = D.translate_items(items, args.langs, cache, load, num_beams=args.num_beams, log=run.log,
                             progress=args.progress) if run.dist.is_main else None
    run.dist.barrier()
    return rows or D.translate_items(items, args.langs, cache, load, log=run.log)


def cross_lingual_pairs(args, rows, run: Run) -> list[dict]:
    say_translation_flags(args, rows, run)                   # flagged translations: left out unless --keep-flagged
    pairs = D.build_pairs(rows, args.langs, args.keep_flagged)
    if run.dist.is_main:
        D.write_jsonl(os.path.join(run.out, "pairs.jsonl"), pairs)
    return pairs


def reference_table(args, model, tokenized, tok, run: Run) -> torch.Tensor:
    """log pi_ref (P, 2) of every pair; --resume: the saved table, if computed for these pairs, model and numerics."""
    ref = load_reference(run) if args.resume else None
    if ref is None:
        per_unit = 2 * len(args.langs) if args.pairing == "items" else 1  # pairs per --batch-size unit
        ref = reference_logps(model, tokenized, 2 * args.batch_size * per_unit, tok.pad_id, run.device,
                              args.progress, run.dist, args.pack_to, args.dtype)
        save_reference(ref, run)
    return ref


# ======================================================================================================================
# Plumbing: torchrun, the run folder, checkpoints, export, the command line. Nothing below is the paper's method.
# ======================================================================================================================
# torchrun (DDP, or FSDP2's fully_shard; one process: world = 1); precision (--dtype bfloat16: mixed precision)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    is_main = property(lambda self: self.rank == 0)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (a no-op alone)."""
        if self.world > 1:
            t = t.clone()
            torch.distributed.all_reduce(t)
        return t

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's t (one shape on all ranks), in rank order, on the CPU (NCCL moves GPU tensors only)."""
        if self.world == 1:
            return [t]
        on = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"  # the current GPU (setup_distributed)
        out = [torch.empty_like(t, device=on) for _ in range(self.world)]
        torch.distributed.all_gather(out, t.to(on))
        return [o.cpu() for o in out]


def setup_distributed(args) -> Dist:
    """Under torchrun (WORLD_SIZE > 1): NCCL on GPUs (one per process, by LOCAL_RANK), gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if args.device.startswith("cuda"):  # this rank's GPU: "cuda" means it from now on (Run.device names it)
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    timeout = datetime.timedelta(minutes=args.dist_timeout)  # long enough for rank 0 to translate while others wait
    torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo", timeout=timeout)
    return Dist(torch.distributed.get_rank(), world)


def wrap_for_training(model, args, dist: Dist):
    """DDP (gradients averaged) or, with --fsdp, FSDP2 (decoder layers sharded); alone, or FSDP: the model itself."""
    if torch.device(args.device).type == "cpu":
        return_freed_memory_to_os()
    if dist.world == 1:
        return model
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[torch.cuda.current_device()] if args.device.startswith("cuda") else None)


def return_freed_memory_to_os(threshold=3 << 20):
    """CPU training: allocations of `threshold` bytes (3 MiB) or more that no free heap chunk fits get their own
    mapping, returned to the OS when freed (glibc's own threshold follows the largest mapping freed, up to 32 MiB: 1-20
    MiB activations stayed in its heap, peak RSS ~2x the live tensors). Not lower: a mapping costs page faults (README,
    Measured). A user's MALLOC_MMAP_THRESHOLD_ or GLIBC_TUNABLES mmap_threshold is kept; off glibc, nothing is done."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "malloc.mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if os.name == "posix" else None  # Windows: no CDLL(None)
    if mallopt is not None:
        mallopt(-3, threshold)  # M_MMAP_THRESHOLD (malloc.h); a fixed value also stops glibc raising it


def unsharded(args, model, run):
    """The model whole, for export: itself; under FSDP (all ranks gather) a copy rebuilt on rank 0 (None elsewhere)."""
    if not (args.fsdp and run.dist.world > 1):
        return model
    trained = {n: full_tensor(p.detach()).cpu() for n, p in model.named_parameters() if p.requires_grad}
    if not run.dist.is_main:
        return None
    model = M.load_model(run.model_folder, args.dtype, "cpu", float32_weights(args.tune, args.dtype))[0]
    set_trainable(model, args.tune, args.lora_targets, args.lora_r, args.lora_alpha, args.lora_dropout)
    model.load_state_dict(trained, strict=False)  # copies into the parameters, in their dtype
    return model


def full_tensor(t):
    """A parameter's whole value, also when FSDP holds only this rank's shard of it (a DTensor)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def finish(run: Run, last: dict) -> dict:
    run.dist.barrier()
    if run.dist.world > 1:
        torch.distributed.destroy_process_group()
    return last


def autocast(device, dtype="float32"):
    """--dtype's forward pass: bfloat16: bf16 autocast (matmuls, attention; the rest and the loss: fp32); else off."""
    bf16 = M.DTYPES.get(dtype, dtype) == torch.bfloat16
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16 if bf16 else None, enabled=bf16)


def float32_weights(tune: str, dtype: str):
    """(name, parameter) -> held in fp32? All under float32; under bfloat16 the trained ones (a bf16 1.0 cannot take an
    Adam step under 0.004) and 1-D ones (norms: an fp32 residual stream); the frozen rest in bf16 (autocast casts)."""
    return lambda name, p: dtype == "float32" or p.dim() == 1 or is_trained(tune, name)


# ----------------------------------------------------------------------------------------------------------------------
# The run folder: every file written atomically, every piece of saved state tagged with the settings it belongs to

RUN = {"out": None, "checkpoint": None}  # what a stopped run leaves: for the one line of Ctrl-C or a full disk


def save_tensors(path: str, tensors: dict, metadata: dict | None = None):
    D.write_atomic(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))


# What saved state depends on. The reference table: the model, the pairs' tokens and the numerics. A checkpoint: that,
# what shapes the updates and the batch plan, and the English items (checked before translating). Not here (they change
# nothing, or only float rounding): --no-pack, --grad-checkpoint, --fsdp, --merge, --save-*, --progress.
REFERENCE_SETTINGS = ("model", "model_files", "dtype", "device", "lang", "max_len", "pairs")

TRAINING_SETTINGS = REFERENCE_SETTINGS + (
    "method", "beta", "lam", "pairing", "tune", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lr",
    "warmup", "weight_decay", "max_grad_norm", "epochs", "max_steps", "batch_size", "grad_accum", "world", "seed",
    "translator", "num_beams", "items")  # the MT settings only when clo translates (not with --translations)

# How a difference in each setting is said; any other key is its flag: "--max-len 1024, now 64"
SAID = {"items": "other English items (--data, --num-samples or the --translations file changed)",
        "pairs": "other training pairs (their tokens differ: --data, --num-samples, --translations or the translation "
                 "cache changed)", "model_files": "other files in --model (config.json or weights changed since)",
        "world": "{old} ranks, now {new}"}
BEFORE = {"pairing": "pairs"}  # what a record made before a setting existed trained with


def run_settings(args, model_folder: str, world: int, date: str | None = None) -> dict:
    """The settings saved state is checked against on --resume (but "items" and "pairs"). model_files: the name, size
    and mtime of config.json and each weight file (a hub snapshot links to blobs named by their content)."""
    h = hashlib.sha256()
    config = [os.path.join(model_folder, "config.json")] * os.path.exists(os.path.join(model_folder, "config.json"))
    for path in config + M.safetensors_files(model_folder):
        st = os.stat(path)
        h.update(f"{os.path.basename(os.path.realpath(path))} {st.st_size} {st.st_mtime_ns}\n".encode())
    s = {"model": os.path.realpath(model_folder), "model_files": h.hexdigest()[:16],
         "device": torch.device(args.device).type, "lang": list(args.langs), "world": world, "date": date}
    skip = [*s, "items", "pairs"] + ["translator", "num_beams"] * bool(args.translations)
    return s | {key: getattr(args, key) for key in TRAINING_SETTINGS if key not in skip}


def setting_differences(old: dict | None, new: dict, keys) -> list[str]:
    """What differs between the settings saved state was made with and this run's, each as SAID says it."""
    if old is None:
        return ["no record of its settings (an older clo)"]
    old = {**BEFORE, **old}

    def show(v):
        return ",".join(map(str, v)) if isinstance(v, list) else ("on" if v else "off") if isinstance(v, bool) else v
    return [SAID.get(k, f"--{k.replace('_', '-')} {{old}}, now {{new}}").format(old=show(old[k]), new=show(new[k]))
            for k in keys if k in old and k in new and old[k] != new[k]]


def refuse_if_changed(what: str, old: dict | None, new: dict, keys):
    diffs = setting_differences(old, new, keys)
    if diffs:
        raise ValueError(f"--resume: {what} was made with {'; '.join(diffs)}. Rerun with the same settings, or use a "
                         "new --out (or drop --resume) to start over.")


@dataclass
class Run:
    """What the steps share: the folder, ranks, log (rank 0 prints), settings saved state is checked against, device,
    --model's folder, the date the chat template writes; --resume: a checkpoint's progress, or summary.json's final."""
    out: str
    dist: Dist
    log: object
    settings: dict
    device: str = "cpu"
    model_folder: str = ""
    date: str = ""
    checkpoint: dict | None = None
    finished: dict | None = None
    report: dict = field(default_factory=dict)  # what became of the pairs: printed, and kept in summary.json


def check_run_folder(args, items) -> Run:
    """Before any weight loads, writing nothing: the ranks, --model resolved (a hub id fetched), the settings; with
    --resume, summary.json (finished) or the newest checkpoint checked against them (ValueError naming what differs)."""
    dist = setup_distributed(args)
    device = f"cuda:{torch.cuda.current_device()}" if dist.world > 1 and args.device.startswith("cuda") else args.device
    RUN.update(out=args.out, checkpoint=None)
    log = print if dist.is_main else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    folder = M.resolve_checkpoint(args.model)
    recorded = os.path.join(args.out, "args.json")  # the date the chat template writes: the run's, on --resume too
    date = M.read_json(recorded).get("date", M.today()) if args.resume and os.path.exists(recorded) else M.today()
    items_digest = hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]
    run = Run(args.out, dist, log, {**run_settings(args, folder, dist.world, date), "items": items_digest}, device,
              folder, date)
    if args.resume and os.path.exists(os.path.join(args.out, "summary.json")):  # "pairs" comes later: record_pairs
        done = M.read_json(os.path.join(args.out, "summary.json"))
        refuse_if_changed(args.out, done.get("settings"), run.settings, [k for k in TRAINING_SETTINGS if k != "items"])
        log(f"{args.out} is finished ({done.get('steps')} steps; see summary.json): nothing to resume. Drop --resume "
            "to train it again, or use a new --out.")
        run.finished = done.get("final", {})
    elif args.resume and (found := find_checkpoint(args.out, log, fix=False)):
        refuse_if_changed(args.out, found[1].get("settings"), run.settings, TRAINING_SETTINGS)
        if 0 < args.stop_after <= found[1]["step"]:  # else it would run one more step and stop there
            raise ValueError(f"--stop-after {args.stop_after}: the checkpoint is already at step {found[1]['step']}; "
                             "give a later step, or drop --stop-after.")
        run.checkpoint, RUN["checkpoint"] = found[1], (os.path.join(args.out, "checkpoint"), found[1]["step"])
    return run


def claim_run_folder(args, run: Run):
    """After the model loads: a new run removes an earlier one's checkpoint (said), metrics and summary, and writes
    args.json; --resume puts a checkpoint a kill left mid-save in place, args.json only if none was found or missing."""
    out, args_path = run.out, os.path.join(run.out, "args.json")
    if args.resume and run.checkpoint is None:
        run.log(f"--resume: no checkpoint in {out}: starting at step 0")
    if run.dist.is_main:
        os.makedirs(out, exist_ok=True)
        found = find_checkpoint(out, run.log, fix=args.resume)  # --resume: a kill's leftovers into place
        if not args.resume:
            if found:
                run.log(f"{out}: removing the checkpoint (step {found[1]['step']}) of an earlier run there; to "
                        "continue that run instead, stop this one and add --resume")
            remove_checkpoints(out)
        for name in ("summary.json", "metrics.jsonl") if run.checkpoint is None else ():  # a run from step 0
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out, name))
        if not args.resume or run.checkpoint is None or not os.path.exists(args_path):
            D.save_json(args_path, {**{k: v for k, v in vars(args).items() if k not in ("stop_after", "resume")},
                                    "model_folder": run.model_folder, "date": run.date})
    run.dist.barrier()


def record_pairs(args, run: Run, tokenized, report: dict, tok):
    """What became of the pairs (said, and in summary.json); their digest (every token id and target flag, in order)
    into the settings. No pairs left, or --resume from a checkpoint that trained other pairs: refused."""
    r = run.report
    r.update(report, pairs=report["pairs"] + r["dropped_flagged"])
    run.log(f"pairs: {r['kept']} kept of {r['pairs']} ({r['dropped_flagged']} dropped for a flagged translation, "
            f"{r['dropped_empty']} for empty text, {r['dropped_long_prompt']} for a prompt over half of --max-len "
            f"{args.max_len}, {r['truncated']} responses truncated; {r['boundary_moved']} with a token across the "
            "prompt/response boundary, scored as response)")
    if not tokenized:
        raise ValueError("no training pairs left after tokenization; raise --max-len or check the data.")
    h = hashlib.sha256()
    for p in tokenized:
        h.update(json.dumps([p.index, p.in_target_lang, p.prompt, p.chosen, p.rejected]).encode())
    run.settings["pairs"] = h.hexdigest()[:16]
    old = (run.checkpoint or {}).get("settings") or {}
    if run.checkpoint and tok.dated and "date" not in old and old.get("pairs") not in (None, run.settings["pairs"]):
        raise ValueError(f"--resume: {run.out} was made by an older clo, which did not record the date the chat "
                         f"template writes (strftime_now), and its pairs differ from today's ({tok.date}); use a "
                         "new --out (or drop --resume) to start over.")
    refuse_if_changed(run.out, old, run.settings, ["pairs"])  # no checkpoint: nothing to compare


def load_translator(args, run: Run):
    """The translator, loaded when the cache lacks a translation (rank 0 only: the others read its cache)."""
    if not run.dist.is_main:
        raise RuntimeError(f"rank {run.dist.rank}: translations missing from the cache that rank 0 wrote.")
    try:
        return D.load_translator(args.translator, args.dtype, run.device)
    except Exception as e:
        raise ValueError(f"--translator {args.translator}: could not load it ({e}). Pass --translations FILE "
                         "with pre-translated data to train without an MT model.") from e


def save_reference(ref, run: Run):
    if run.dist.is_main:
        save_tensors(os.path.join(run.out, "reference_logps.safetensors"), {"logps": ref.contiguous()},
                     {"settings": json.dumps({k: run.settings[k] for k in REFERENCE_SETTINGS})})


def load_reference(run: Run):
    """The saved reference table, if whole and computed for these pairs, model and numerics; else None, and why."""
    path, settings, log = os.path.join(run.out, "reference_logps.safetensors"), run.settings, run.log
    if not os.path.exists(path):
        return None
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            old = json.loads((f.metadata() or {}).get("settings", "null"))
            logps = f.get_tensor("logps")
    except Exception:
        log(f"{path}: unreadable (cut short by a kill?): recomputing it")
        return None
    diffs = setting_differences(old, settings, REFERENCE_SETTINGS[:-1]) or setting_differences(old, settings, ["pairs"])
    if diffs:
        log(f"{path}: computed with {'; '.join(diffs)}: recomputing it")
    return None if diffs else logps


def remove_checkpoints(out: str):
    for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"):
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)


def stopped_run_note() -> str:
    """The sentence saying what a run stopped by Ctrl-C or a full disk leaves, for exit_on_error's one line."""
    if RUN["checkpoint"]:
        return "kept: {} (step {}); continue with --resume".format(*RUN["checkpoint"])
    if RUN["out"]:
        return (f"no checkpoint in {RUN['out']} yet: --resume will start at step 0 (finished translations are kept "
                "in its cache)")
    return ""


# ----------------------------------------------------------------------------------------------------------------------
# The loop's bookkeeping: checkpoints (a temporary folder, renamed into place), resume, the metrics line, reports


class Checkpoints:
    """--out/checkpoint. restore(): --resume's, before the loop. after_step(): a save every --save-every steps (default:
    a quarter of the run), every --save-minutes (the ranks agree), and after step --stop-after, which ends the run."""

    def __init__(self, args, run: Run, model, optimizer, total: int):
        self.args, self.run, self.model, self.optimizer, self.total = args, run, model, optimizer, total
        self.folder = os.path.join(run.out, "checkpoint")
        self.every = math.ceil(total / 4) if args.save_every is None else args.save_every

    def restore(self) -> tuple[int, int]:
        """(step, batches done): the checkpoint's, restored, or (0, 0); metrics.jsonl keeps the lines up to it."""
        run, step, done, metrics = self.run, 0, 0, os.path.join(self.run.out, "metrics.jsonl")
        if run.checkpoint is not None:
            progress = load_checkpoint(self.folder, self.model, self.optimizer, run.dist, run.log)
            step, done = progress["step"], progress["batches_done"]
            run.log(f"resumed from {self.folder} at step {step} of {self.total}")
            if run.dist.is_main and os.path.exists(metrics):
                rows = D.read_jsonl(metrics, own=True, log=run.log)  # a torn last line is dropped and said
                D.write_jsonl(metrics, [{k: v for k, v in r.items() if k != "_line"} for r in rows
                                        if r.get("step", 0) <= step])
        cadence = [f"every {self.every} steps"] * bool(self.every) + [
            f"every {self.args.save_minutes:g} minutes"] * bool(self.args.save_minutes)
        run.log(f"checkpoints: {' and '.join(cadence) or 'none'} ({self.total} steps in all), in {self.folder}")
        self.saved_at = time.perf_counter()
        run.dist.barrier()
        return step, done

    def after_step(self, step: int, batches_done: int) -> bool:
        args, dist = self.args, self.run.dist
        due = bool(self.every) and step % self.every == 0
        if args.save_minutes:
            late = time.perf_counter() - self.saved_at >= 60 * args.save_minutes
            if dist.world > 1:  # every rank takes part in a save (FSDP gathers): rank clocks differ, so agree
                late = dist.sum(torch.tensor([float(late)], device=self.run.device)).item() > 0
            due = due or late
        stop = bool(args.stop_after) and args.stop_after <= step < self.total
        if (due and step < self.total) or stop:  # the final step needs none: the outputs follow
            save_checkpoint(self.folder, self.model, self.optimizer, step, batches_done, dist, self.run.settings)
            self.saved_at = time.perf_counter()
            RUN["checkpoint"] = (self.folder, step)
        if stop:
            self.run.log(f"stopped after step {step} of {self.total} (--stop-after {args.stop_after}): checkpoint in "
                         f"{self.folder}; continue with: python clo.py ... --out {shlex.quote(self.run.out)} --resume "
                         "(the same options)")
            dist.barrier()
        return stop


def save_checkpoint(folder, model, optimizer, step, batches_done, dist: Dist, settings: dict):
    """Trainable weights, AdamW state (FSDP: gathered), each rank's random state (rng/cpu/RANK, rng/cuda/RANK), progress
    and settings; rank 0 writes folder.tmp, swapped in by two renames (find_checkpoint: what a kill between leaves)."""
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    tensors = {f"param/{n}": full_tensor(p.detach()).cpu().contiguous().clone() for n, p in model.named_parameters()
               if p.requires_grad}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                v = full_tensor(v.detach()).cpu()
                tensors[f"optim/{k}/{names[id(p)]}"] = v.reshape(-1).clone() if v.dim() == 0 else v.contiguous()
    device = next(model.parameters()).device
    states = {"cpu": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda"
                                               else {})
    for kind, state in states.items():  # the dropout masks differ by rank: each rank's own state, restored by it
        tensors |= {f"rng/{kind}/{r}": t for r, t in enumerate(dist.gather(state))}
    if not dist.is_main:
        return
    tmp, old = folder + ".tmp", folder + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        save_tensors(os.path.join(tmp, "state.safetensors"), tensors)
        D.save_json(os.path.join(tmp, "progress.json"), {"step": step, "batches_done": batches_done,
                                                       "settings": settings})  # last: marks tmp complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk: free what this save took; the last checkpoint stays
        raise
    shutil.rmtree(old, ignore_errors=True)  # a kill may have left one; os.replace cannot overwrite a full folder
    if os.path.exists(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out: str, log=print, fix: bool = True) -> tuple[str, dict] | None:
    """The newest complete checkpoint: checkpoint/, .tmp/ (a kill before its rename) or .old/ (between the renames);
    with `fix` (rank 0) moved to checkpoint/, the leftovers removed. Returns (checkpoint folder, progress) or None."""
    base, found = os.path.join(out, "checkpoint"), []
    for order, path in enumerate((base, base + ".tmp", base + ".old")):
        with contextlib.suppress(Exception):  # complete: progress.json whole, and safetensors finds every tensor
            progress = M.read_json(os.path.join(path, "progress.json"))  # its header names in state.safetensors
            with safetensors.safe_open(os.path.join(path, "state.safetensors"), framework="pt"):
                found.append((int(progress["step"]), -order, path, progress))
    if not found:
        return None
    _, _, path, progress = max(found)
    if fix:
        if path != base:
            shutil.rmtree(base, ignore_errors=True)
            os.replace(path, base)
            log(f"checkpoint: took {path} (step {progress['step']}), which a kill during a save left, as {base}")
        for leftover in (base + ".tmp", base + ".old"):
            shutil.rmtree(leftover, ignore_errors=True)
    return (base if fix else path), progress


def load_checkpoint(folder, model, optimizer, dist: Dist, log):
    """Restores what save_checkpoint wrote into a plain, DDP or FSDP model, its optimizer and this rank's random state
    (another number of ranks was refused); an older checkpoint's one "rng/cpu" goes to every rank, as before."""
    def laid_out_like(full, ref):  # a full tensor on ref's device, sharded as ref is if an FSDP DTensor
        if hasattr(ref, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor
            return distribute_tensor(full.to(ref.device), ref.device_mesh, ref.placements)
        return full.to(ref.device)
    tensors = safetensors.torch.load_file(os.path.join(folder, "state.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, t in tensors.items():
            if key.startswith("param/"):
                params[key[6:]].copy_(laid_out_like(t, params[key[6:]]))
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = next(n for n, q in params.items() if q is p)
            got = {k: tensors.get(f"optim/{k}/{name}") for k in ("step", "exp_avg", "exp_avg_sq")}
            state = {k: laid_out_like(t, p) if k != "step" else t.reshape(()) for k, t in got.items() if t is not None}
            if state:
                optimizer.state[p] = state
    device, old = next(model.parameters()).device, "rng/cpu" in tensors  # old: rank 0's CPU state alone, for all
    if old and (dist.world > 1 or device.type == "cuda"):
        log(f"{folder}: an older checkpoint (rank 0's CPU random state alone): with dropout, not bitwise equal to an "
            "uninterrupted run")
    torch.set_rng_state(tensors["rng/cpu" if old else f"rng/cpu/{dist.rank}"])
    if device.type == "cuda" and not old:
        torch.cuda.set_rng_state(tensors[f"rng/cuda/{dist.rank}"], device)
    return M.read_json(os.path.join(folder, "progress.json"))


class StepLog:
    """The metrics line of each optimizer step: into metrics.jsonl (rank 0) and the progress bar; returned."""

    def __init__(self, args, run: Run, step: int, total: int, batches_per_epoch: int):
        self.run, self.batches_per_epoch, self.path = run, batches_per_epoch, os.path.join(run.out, "metrics.jsonl")
        self.bar = tqdm(total=total, initial=step, desc=f"{args.method} training",
                        disable=not (args.progress and run.dist.is_main))
        self.t0, self.pairs_seen = time.perf_counter(), 0

    def __call__(self, step, batches_done, summed, in_step, lr, grad_norm) -> dict:
        """summed: the step's (loss, nll, pair loss, reward acc, margin), summed over micro-batches and ranks."""
        self.pairs_seen += len(in_step)
        loss, nll, pair_loss, acc, margin = summed.tolist()
        n_target = sum(p.in_target_lang for p in in_step)
        last = {"step": step, "epoch": round(batches_done / self.batches_per_epoch, 3), "loss": round(loss, 5),
                "nll": round(nll, 5), "pair_loss": round(pair_loss, 5), "reward_acc": round(acc, 5),
                "margin": round(margin, 5), "en_pairs": len(in_step) - n_target, "target_pairs": n_target, "lr": lr,
                "grad_norm": round(grad_norm, 4),
                "pairs_per_s": round(self.pairs_seen / (time.perf_counter() - self.t0), 3)}
        if self.run.dist.is_main:
            D.append_jsonl(self.path, [last])  # whole lines, fsynced: a kill never leaves half a line
        self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.2f}", margin=f"{margin:.3f}", nll=f"{nll:.3f}")
        self.bar.update(1)
        return last


def stop_if_not_finite(parts, step: int, checkpoint: str):
    if not torch.isfinite(parts.loss):
        raise FloatingPointError(f"step {step + 1}: the loss is {parts.loss.item()} (nll {parts.nll.item()}, pair "
                                 f"loss {parts.pair_loss.item()}). Training stopped; the last good checkpoint is "
                                 f"{checkpoint} (if one was written). Try a lower --lr, or --dtype float32.")


def say_training(args, model, wrapped, tokenized, run: Run):
    """What trains, on how many pairs and ranks; and the pairs that train's batch plan leaves out."""
    run.log(f"training {sum(p.numel() for p in model.parameters() if p.requires_grad):,} parameters ({args.tune}: "
            f"{len(wrapped)} tensors/modules), {len(tokenized)} pairs" + (
                f", {run.dist.world} ranks ({'FSDP' if args.fsdp else 'DDP'})" if run.dist.world > 1 else ""))
    left_out = len(tokenized) - sum(len(g) for b in global_batches(tokenized, args, run.dist, 0) for g in b)
    if left_out:  # every rank must take part in every step
        run.log(f"{left_out} pair(s) left out of every epoch: the last length-grouped batch has fewer {args.pairing} "
                f"than the {run.dist.world} ranks (use a --batch-size that divides the {args.pairing}, or fewer "
                "ranks, to keep them)")


def load_policy(args, run: Run):
    """The model to train, in --dtype (float32_weights); first its dtype and memory (training_bytes) are said."""
    shards = run.dist.world if args.fsdp else 1
    cfg = M.LlamaConfig.from_hf(M.read_json(os.path.join(run.model_folder, "config.json")))
    need = training_bytes(cfg, args.tune, args.dtype, args.lora_targets, args.lora_r, shards)
    gib = {k: f"{v / 2 ** 30:.2f} GiB" if v >= 2 ** 30 else f"{v / 2 ** 20:.1f} MiB"
           for k, v in {**need, "all": sum(need.values())}.items()}
    run.log(f"dtype: {args.dtype} ({args.dtype_reason})" + (": mixed precision: frozen weights in bf16, trained "
            "ones, their gradients and AdamW state in fp32, bf16 autocast" if args.dtype == "bfloat16" else ""))
    run.log(f"memory{' per rank' * (shards > 1)}: weights {gib['weights']}, gradients {gib['gradients']}, AdamW "
            f"state {gib['optimizer']}; {gib['all']} in all, activations not counted")
    model, tok = M.load_model(run.model_folder, args.dtype, run.device, float32_weights(args.tune, args.dtype))
    tok.date = run.date
    if tok.dated:
        run.log(f"chat template: writes the date (strftime_now): {tok.date}, this run's (args.json; kept on --resume)")
    return model, tok


def say_translation_flags(args, rows, run: Run):
    flags = D.translation_flags(rows, args.langs)
    if flags["flagged"]:
        kept = "kept (--keep-flagged)" if args.keep_flagged else "left out of the pairs (--keep-flagged keeps them)"
        run.log(f"translation problems: {flags['flagged']} item translations flagged ({flags['cut']} with a sentence "
                f"cut at the MT model's input limit or output cap, {flags['degenerate']} degenerate after a retry; "
                f"marked in {args.translations or os.path.join(run.out, 'translations.jsonl')}): {kept}")
    run.report.update(translation_flags=flags, dropped_flagged=0 if args.keep_flagged else 2 * flags["flagged"])


def training_bytes(cfg: M.LlamaConfig, tune: str, dtype: str, targets=ATTENTION_PROJECTIONS, r: int = 16,
                   shards: int = 1) -> dict[str, int]:
    """Bytes per rank of weights, gradients and AdamW state (two moments and a 4-byte step per trained tensor), on a
    weightless copy held and made trainable as the run's is. shards: FSDP's ranks (each holds ceil(rows / shards) rows
    of every tensor). Activations and FSDP's gathered layer come on top. ValueError: LoRA targets naming no layer."""
    with torch.device("meta"):
        model = M.build_on_meta(M.LlamaForCausalLM, cfg, M.DTYPES[dtype], "meta", float32=float32_weights(tune, dtype))
        set_trainable(model, tune, targets, r, 2.0 * r, 0.0)
    def size(p):
        return -(-p.shape[0] // shards) * (p.numel() // max(1, p.shape[0])) * p.element_size() if p.dim() else 4
    trained = [p for p in model.parameters() if p.requires_grad]
    return {"weights": sum(map(size, model.parameters())), "gradients": sum(map(size, trained)),
            "optimizer": sum(2 * size(p) + 4 for p in trained)}


# ----------------------------------------------------------------------------------------------------------------------
# Output (a PEFT adapter, a merged Hugging Face checkpoint, the final lines) and the command line


def save_outputs(args, model, last, run: Run):
    """The adapter and/or the merged checkpoint, then summary.json (finished); the checkpoint goes; the last lines."""
    model.eval()
    model = unsharded(args, model, run)  # FSDP: gathered, and whole on rank 0 only
    if run.dist.is_main:
        if args.tune == "lora":
            save_adapter(run.out, model, args)
        if args.merge or args.tune != "lora":
            save_merged(os.path.join(run.out, "merged"), model, model.source, args.dtype)
        D.save_json(os.path.join(run.out, "summary.json"), {"run": run.out, "steps": last.get("step"), "final": last,
                    "pairs": run.report, "ranks": run.dist.world, "settings": run.settings})
        remove_checkpoints(run.out)
        RUN["checkpoint"] = None
        run.log(final_message(args, run.out, last))


def save_adapter(out, model, args):
    """adapter_model.safetensors + adapter_config.json in peft's layout (peft and vLLM load them as they are)."""
    save_tensors(os.path.join(out, "adapter_model.safetensors"), M.lora_state_dict(model), {"format": "pt"})
    local = M.is_local_path(args.model)  # a hub id stays an id; --model ~/m becomes its absolute path
    base = os.path.abspath(os.path.expanduser(args.model)) if local else args.model
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
              "r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
              "target_modules": sorted(set(args.lora_targets)), "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "use_rslora": False,
              "use_dora": False, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
              "alpha_pattern": {}, "revision": None}
    D.save_json(os.path.join(out, "adapter_config.json"), config)


def save_merged(folder, model, source, dtype=None):
    """A full checkpoint transformers loads, each tensor in `source`'s dtype (fp32 for dtype float32: its update kept),
    config saying so: a frozen one bit for bit; a trained one, or a base weight plus its adapter (W + scaling B A in
    fp32), rounded to it once. Merged in place (as eval.py does); a tied model's adapted lm_head is written untied."""
    os.makedirs(folder, exist_ok=True)
    deltas = {f"{n}.weight": m.delta() for n, m in M.lora_modules(model).items()}
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}
    M.merge_lora(model)
    wide = torch.float32 if dtype == "float32" else None  # frozen tensors widened exactly
    state = {k: t.to(wide) for f in M.safetensors_files(source) for k, t in safetensors.torch.load_file(f).items()}
    if "model.embed_tokens.weight" not in state:  # a tied checkpoint that stores its matrix as lm_head.weight only
        state["model.embed_tokens.weight"] = state.pop("lm_head.weight")
    if "lm_head.weight" in deltas:  # a tied checkpoint has no lm_head of its own: the embedding is its base
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    state |= {key: t.to("cpu", state[key].dtype) for key, t in trained.items()}
    state |= {key: (state[key].float() + d.cpu()).to(state[key].dtype) for key, d in deltas.items()}
    save_tensors(os.path.join(folder, "model.safetensors"), {k: v.contiguous() for k, v in state.items()},
                 {"format": "pt"})
    for name in M.HUB_FILES:  # config, tokenizer and chat template files
        if os.path.exists(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), folder)
    config = M.read_json(os.path.join(folder, "config.json"))
    # an lm_head merge_lora untied is a matrix of its own: a loader that still tied it would drop it
    config["tie_word_embeddings"] = config.get("tie_word_embeddings", False) and model.config.tie_word_embeddings
    for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]:  # transformers v5, v4
        config[key] = str(state["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    D.save_json(os.path.join(folder, "config.json"), config)


def command_line() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Cross-Lingual Optimization: move an English chat model to a language.",
                                formatter_class=D.HelpWithDefaults)
    p.add_argument("--model", required=True, help="chat model to adapt: a local checkpoint folder or a hub id")
    p.add_argument("--lang", required=True, help="target language(s), ISO 639-1 or FLORES-200: ko, or ko,sw")
    p.add_argument("--out", help="run folder (default: runs/<model>-<lang>-<method>)")
    p.add_argument("--data", help="English data: Alpaca/chat JSON(L) or oasst1 (default: --translations', or samples/)")
    p.add_argument("--num-samples", type=int, help="use the first N items (paper: 3200 or 6400; default: all)")
    p.add_argument("--translations", help="parallel JSONL of pre-translated data: no MT model (default: none)")
    p.add_argument("--translator", default="facebook/nllb-200-distilled-600M", help="M2M100/NLLB folder or hub id")
    p.add_argument("--num-beams", type=int, default=4, help="translation beam width")
    p.add_argument("--keep-flagged", action="store_true", help="also train on flagged translations (cut, degenerate)")
    p.add_argument("--method", default="clo", choices=tuple(METHODS), help="the loss (clo.METHODS): clo is the paper's")
    p.add_argument("--beta", type=float, help="DPO temperature of the pair term (default 0.1; not for sft methods)")
    p.add_argument("--lam", type=float, help="NLL term's weight (default 0.5; clo, clo-en-nll only: the others fix it)")
    p.add_argument("--tune", default="attn", choices=("attn", "lora", "full"), help="attention Q/K/V/O, LoRA, or all")
    p.add_argument("--lora-r", type=int, help="LoRA rank (default 16; --tune lora only)")
    p.add_argument("--lora-alpha", type=float, help="LoRA scale: alpha / r (default 32)")
    p.add_argument("--lora-dropout", type=float, help="dropout on LoRA's input, 0 to <1 (default 0)")
    p.add_argument("--lora-targets", help="LoRA's linear layers, comma-separated (default q_proj,k_proj,v_proj,o_proj)")
    p.add_argument("--pairing", default="items", choices=("items", "pairs"), help="whole items, or pairs one by one")
    p.add_argument("--epochs", type=int, default=3, help="passes over the pairs")
    p.add_argument("--max-steps", type=int, default=0, help="stop after N optimizer steps (0: run --epochs)")
    p.add_argument("--batch-size", type=int, help="items per micro-batch and rank (default 2; --pairing pairs: 4)")
    p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 1e-4 for lora, 5e-6 for attn/full)")
    p.add_argument("--warmup", type=float, default=0.1, help="warmup: a fraction of steps (<1) or a step count")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    p.add_argument("--max-len", type=int, default=1024, help="max tokens of prompt + response (see data.py)")
    p.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing: less memory")
    p.add_argument("--no-pack", dest="pack", action="store_false", help="right-padded rows of one sequence, no packing")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch order, LoRA init and dropout")
    p.add_argument("--dtype", default="auto", choices=M.DTYPE_CHOICES, help="auto: bf16 where the hardware has it")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (default: a quarter of the run's steps; "
                   "0: not by steps)")
    p.add_argument("--save-minutes", type=float, default=30.0, help="also checkpoint every M minutes (0: never)")
    p.add_argument("--resume", action="store_true", help="continue the stopped or killed run in --out")
    p.add_argument("--stop-after", type=int, default=0, help="checkpoint and exit after step N, for --resume (0: no)")
    p.add_argument("--merge", action="store_true", help="--tune lora: also write RUN_DIR/merged (attn and full do)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars (logs still print)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model (FSDP2) instead of DDP")
    p.add_argument("--dist-timeout", type=float, default=180.0, help="minutes a rank may wait for the others")
    return p


def ignored_flags(method: str) -> dict[str, str]:
    """The flags --method ignores, each with why: --lam where METHODS fixes lambda, --beta where lambda is 1 (SFT: no
    pair term). clo.py refuses them; bench/experiments.py leaves them out."""
    lam, flags = METHODS[method][0], {}
    if lam is not None:
        flags["--lam"] = f"--method {method} fixes lam at {lam:g}; drop --lam, or use --method clo."
    if lam == 1.0:
        flags["--beta"] = f"--method {method} has no pair term (lam 1); drop --beta."
    return flags


def parse_args(argv=None):
    """The options, with clo's defaults filled in (README: options and defaults) and checked (check_args)."""
    a = command_line().parse_args(argv)
    a.langs = [l.strip() for l in a.lang.split(",") if l.strip()]
    lam, lora = METHODS[a.method][0], [k for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")
                                       if getattr(a, k) is not None]
    for flag, why in ignored_flags(a.method).items():  # a setting that would be silently ignored is refused
        if getattr(a, flag[2:]) is not None:
            raise ValueError(f"{flag} {getattr(a, flag[2:])}: {why}")
    if lora and a.tune != "lora":
        flag = "--" + lora[0].replace("_", "-")
        raise ValueError(f"{flag} {getattr(a, lora[0])}: --tune {a.tune} trains full weights, without LoRA; add "
                         f"--tune lora, or drop {flag}.")
    defaults = {"lam": lam if lam is not None else 0.5, "beta": 0.1, "lora_r": 16, "lora_alpha": 32.0,
                "lora_dropout": 0.0, "lora_targets": ",".join(ATTENTION_PROJECTIONS),
                "batch_size": 2 if a.pairing == "items" else 4,
                "lr": 1e-4 if a.tune == "lora" else 5e-6,  # clo's choices (README: options and defaults)
                "out": os.path.join("runs", f"{os.path.basename(a.model.rstrip('/'))}-{'_'.join(a.langs)}-{a.method}")}
    vars(a).update({k: v for k, v in defaults.items() if getattr(a, k) is None})
    a.lora_targets = [t.strip() for t in a.lora_targets.split(",") if t.strip()]
    a.pack_to = a.max_len if a.pack else None
    check_args(a)  # before the dtype, which reads --device
    a.dtype, a.dtype_reason = M.resolve_dtype(a.dtype, a.device)
    return a


def check_args(a):
    """The checks that need no data and no weights: nothing is written or loaded when one fails. Raises ValueError,
    one line naming the option, value (file) and what to do. A hub --model is not looked up here (check_run_folder)."""
    at_least = {"--epochs": (a.epochs, 1), "--batch-size": (a.batch_size, 1), "--grad-accum": (a.grad_accum, 1),
                "--max-len": (a.max_len, 1), "--num-beams": (a.num_beams, 1), "--lora-r": (a.lora_r, 1),
                "--num-samples": (a.num_samples, 1), "--max-steps": (a.max_steps, 0), "--stop-after": (a.stop_after, 0),
                "--save-every": (a.save_every, 0), "--save-minutes": (a.save_minutes, 0), "--warmup": (a.warmup, 0),
                "--weight-decay": (a.weight_decay, 0), "--max-grad-norm": (a.max_grad_norm, 0)}
    for flag, (value, low) in at_least.items():
        if value is not None and value < low:
            raise ValueError(f"{flag} {value}: must be at least {low}.")
    for flag, value in {"--lr": a.lr, "--beta": a.beta, "--lora-alpha": a.lora_alpha,
                        "--dist-timeout": a.dist_timeout}.items():
        if not value > 0:
            raise ValueError(f"{flag} {value}: must be above 0.")
    if not 0 <= a.lam <= 1:
        raise ValueError(f"--lam {a.lam}: must be between 0 and 1 (the NLL term's weight; 1 - lam on the pair term).")
    if not 0 <= a.lora_dropout < 1:
        raise ValueError(f"--lora-dropout {a.lora_dropout}: must be at least 0 and below 1.")
    if not a.lora_targets:
        raise ValueError("--lora-targets is empty; name linear layers, e.g. q_proj,k_proj,v_proj,o_proj.")
    if a.dtype != "auto" and M.resolve_dtype(a.dtype, "cpu")[0] == "float16":  # needs no device: before the files
        raise ValueError("--dtype float16: training in fp16 needs loss scaling, which clo does not implement; use "
                         "--dtype bfloat16 (mixed precision) or float32.")
    device = M.check_device(a.device)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {a.device}: there are {torch.cuda.device_count()} GPUs (cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {a.device}: MPS is not available here; use --device cpu.")
    if a.data and a.data != "oasst1" and not os.path.isfile(a.data):
        raise ValueError(f"--data {a.data}: no such file.")
    if not a.translations:  # with a file: its columns, once read_data reads it
        D.check_languages(a.langs)
    if M.is_local_path(a.model):
        raw, config = M.check_checkpoint_folder(a.model), os.path.join(os.path.expanduser(a.model), "config.json")
        if a.tune == "lora":  # on a weightless copy: a bad --lora-targets is said before anything loads
            with torch.device("meta"):
                M.check_lora_targets(M.LlamaForCausalLM(M.LlamaConfig.from_hf(raw, config)), a.lora_targets)
    out = os.path.abspath(a.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {a.out}: is a file; give a folder (created if missing).")
    if a.resume and not os.path.exists(out):  # a typo in --out must not quietly start hours of new training
        raise ValueError(f"--resume: {a.out} does not exist, so there is nothing to resume; check --out, or drop "
                         "--resume to start a new run.")
    above = os.path.dirname(out)
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise ValueError(f"--out {a.out}: {above} is a file, so the folder cannot be made there; give another path.")
    if not os.access(above, os.W_OK):
        raise ValueError(f"--out {a.out}: {above} is not writable; give a folder you can write to.")


def read_data(args) -> tuple[list[dict], list[dict] | None]:
    """The English items (x_en, y_en): --data, else the English side of --translations, else the Alpaca seed tasks
    shipped in samples/; with --translations also its rows for them (x_l, y_l): each file read once, whole."""
    items = D.load_sft(args.data, args.num_samples) if args.data or not args.translations else None
    rows = D.read_parallel(args.translations, args.langs, args.num_samples, items) if args.translations else None
    if items is None:
        items = [{"instruction": r["en_instruction"], "response": r["en_response"]} for r in rows]
    return items, rows


def final_message(args, out: str, last: dict) -> str:
    """The lines a finished run ends with (rank 0): train's last metrics, where each output is, what to run next."""
    q, merged, lora = shlex.quote, os.path.join(out, "merged"), args.tune == "lora"
    full = args.merge or not lora  # merged/ was written
    return "\n".join(
        [f"done: {out}  step {last.get('step')}  loss {last.get('loss')}  reward acc {last.get('reward_acc')}  "
         f"margin {last.get('margin')}  nll {last.get('nll')}"]
        + [f"  adapter:  {os.path.join(out, 'adapter_model.safetensors')} + adapter_config.json (PEFT LoRA on "
           f"{args.model})"] * lora
        + [f"  merged:   {merged}/ (a full checkpoint: config.json, model.safetensors, tokenizer)"] * full
        + [f"  metrics:  {os.path.join(out, 'metrics.jsonl')} (one line per step); summary: "
           f"{os.path.join(out, 'summary.json')}; every pair built: {os.path.join(out, 'pairs.jsonl')}",
           f"next: python eval.py --models base={q(args.model)} {args.method}={q(out)} --langs "
           f"{','.join(args.langs)} --out {q(out + '-eval')}"]
        + [f"  transformers: AutoModelForCausalLM.from_pretrained({merged!r})"] * full
        + [f"  peft: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({args.model!r}), {out!r})"] * lora)


if __name__ == "__main__":
    D.exit_on_error(main, FloatingPointError, kept=stopped_run_note)
