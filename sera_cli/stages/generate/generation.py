"""`sera generate`: N distinct sampled responses per prompt, written as a candidates table.

The distinct prompts are cut into fixed chunks of `chunk_prompts`, in input order. A chunk is the unit of work:
its prompts (and its re-draws) are batched only with each other, and its rows are saved under a partial folder
beside the output as soon as it is done. So `--resume` redoes nothing that finished, `--shard i/n` (a contiguous
run of whole chunks) concatenated in order equals a full run, and both give exactly the rows of a full run.
The output is written atomically at the end (optionally after scoring every candidate, `--score`).

What is guaranteed: the same input, seed, model, engine, dtype, device, `--batch-size`, `--chunk-prompts` and
library versions give identical output. Each prompt's random numbers come from (seed, prompt id), so changing
the batch size or chunking changes a prompt's samples only through float rounding of padded batches (rare
flips of near-tied tokens), never through its random stream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from sera_cli.backends.chat_templates import folded_record, stop_ids
from sera_cli.backends.engines.sampling import Request, collect, trim
from sera_cli.data import provenance
from sera_cli.data.chunk_store import (
    ChunkStore,
    chunk_key,
    progress,
    shard_record,
    shard_rows,
    token_digest,
    with_rows,
)
from sera_cli.data.console import console
from sera_cli.data.errors import ConfigError
from sera_cli.data.tables import (
    Inputs,
    check_folder_writable,
    check_writable,
    inputs_of,
    read_inputs,
    write_parquet,
)
from sera_cli.stages.generate.config import GenerateConfig
from sera_cli.stages.generate.prompts import Prompts, check_lengths, read_prompts, tokenize_prompts

COLUMNS = ("prompt_id", "prompt", "response", "sample_idx", "finish_reason", "ntok", "id")
# A finished chunk on disk: `index` is the prompt's place among the run's distinct prompts.
CHUNK = pa.schema([("index", pa.int64()), ("response", pa.string()), ("sample_idx", pa.int32()),
                   ("finish_reason", pa.string()), ("ntok", pa.int32())])


@dataclass(frozen=True)
class GenerateSummary:
    prompts: int
    responses: int
    short_prompts: int  # prompts with fewer than n distinct responses after the re-draws
    missing: int  # responses those prompts lack
    repeated: int  # input rows that repeated an earlier prompt (generated once)
    resumed: int  # chunks taken from an interrupted run
    tokens: int
    seconds: float  # generating (model loading and the rest excluded)
    total_seconds: float
    engine: str
    output: str
    stale: int = 0  # saved chunks generated again: made by other weights, settings or prompts

    def line(self) -> str:
        rate = f", {self.tokens / self.seconds:,.0f} tokens/s" if self.tokens and self.seconds > 0 else ""
        notes = [f"{self.short_prompts:,} prompts short of distinct responses ({self.missing:,} missing)"
                 if self.short_prompts else "", f"{self.repeated:,} repeated prompts skipped" if self.repeated else "",
                 f"{self.resumed:,} chunks resumed" if self.resumed else "",
                 f"{self.stale:,} stale chunks generated again" if self.stale else ""]
        extra = "".join(f"; {n}" for n in notes if n)
        return (f"generated {self.responses:,} responses for {self.prompts:,} prompts with {self.engine} "
                f"({self.tokens:,} new tokens{rate}){extra} -> {self.output}")


@dataclass(frozen=True)
class Sample:
    text: str
    finish_reason: str
    ntok: int


def run_here(config: GenerateConfig, cluster=None) -> GenerateSummary:
    """One process's run; `cluster` (`on_ray.RayGeneration`, the Ray path) generates the chunks on its actors."""
    t0 = time.perf_counter()
    config.check()
    check_writable(config.output, inputs_of(config))
    if config.cache:
        check_folder_writable(config.cache, [i for i in inputs_of(config) if i != config.cache], what="--cache")
    with ChunkStore(config.output, "generate", config.resume) as store:
        return _generate(config, store, t0, cluster)


def _generate(config: GenerateConfig, store: ChunkStore, t0: float, cluster=None) -> GenerateSummary:
    from sera_cli.backends.models import (
        check_context,
        check_same_tokenizer,
        check_same_vocab,
        load_tokenizer,
        model_context,
        resolve,
        tokenizer_fingerprint,
    )
    from sera_cli.data.lineage import parents

    inputs = read_inputs(list(config.inputs))
    prompts = read_prompts(inputs)
    ref = resolve(config.policy)
    tok = load_tokenizer(ref, config.trust_remote_code)
    if config.score and config.ref:  # before generating: a mismatch found after it would waste the run
        scoring_ref = resolve(config.ref)
        ref_tok = load_tokenizer(scoring_ref, config.trust_remote_code)
        check_same_tokenizer(tok, ref_tok, config.policy, config.ref)
        check_same_vocab(ref, scoring_ref, config.trust_remote_code)
    if config.score and config.prev_policy:  # the previous pair's models too, before any work
        for spec in (config.prev_policy, config.prev_ref):
            if spec:
                check_same_tokenizer(tok, load_tokenizer(resolve(spec), config.trust_remote_code), config.policy,
                                     spec)
    start, stop = shard_rows(len(prompts.ids), config.chunk_prompts, config.shard)
    tokens, folded = tokenize_prompts(tok, inputs, prompts, start, stop)
    context = model_context(ref, config.trust_remote_code)
    check_lengths(inputs, _slice(prompts, start, stop), tokens, config.max_new_tokens, context)
    check_context([ref], [0] * len(tokens), lambda i: inputs.locate(prompts.rows[start + i]),
                  config.trust_remote_code, max_ids=[max(t, default=0) for t in tokens])  # ids with embeddings
    stops = stop_ids(ref.path, tok, chat=prompts.kind == "conversational")
    engine_id = cluster.engine_identity() if cluster else engine_identity(config)
    work = _Work(config, store, prompts, start, stop, tokens, stops, tok, identity={
        "model": ref.fingerprint, "tokenizer": tokenizer_fingerprint(tok), "engine": engine_id,
        "sampling": config.sampling(), "stops": stops})
    if cluster:
        cluster.generate(work, stops, tokens, context)
    else:
        work.run(lambda: open_engine(config, ref, tok, engine_id["name"], stops, tokens, context))
    table = _table(inputs, prompts, work.rows())
    n_per = pc.value_counts(table.column("prompt_id")) if table.num_rows else []
    short = (stop - start) - sum(1 for c in n_per if c["counts"].as_py() >= config.n)
    missing = (stop - start) * config.n - table.num_rows
    prov = provenance.record(
        "generate", {k: v for k, v in config.as_dict().items() if k != "progress"},
        models={"policy": ref.identity()}, engine=engine_id, sampling=config.sampling(), stop_ids=stops,
        prompts=stop - start, responses=table.num_rows, shortfall={"prompts": short, "missing": missing},
        **({"shard": with_rows(shard_record(list(prompts.ids), config.chunk_prompts, config.shard), table)}
           if config.shard else {}),
        parents=parents(inputs), **({"ray": cluster.record()} if cluster else {}),
        **folded_record(folded))
    table = provenance.attach(table, prov)
    if config.score:
        table = _score(config, table, cluster)
    write_parquet(table, config.output)
    store.finish()
    return GenerateSummary(stop - start, table.num_rows, short, missing, prompts.repeated, store.resumed,
                           work.new_tokens, work.seconds, time.perf_counter() - t0, engine_id["name"], config.output,
                           store.stale)


def _slice(p: Prompts, start: int, stop: int) -> Prompts:
    return Prompts(p.ids[start:stop], p.texts[start:stop], p.rows[start:stop], p.kind, p.repeated)


def engine_identity(config: GenerateConfig) -> dict[str, Any]:
    """The engine and the numeric settings it runs with (resolved, so 'auto' never hides a choice)."""
    import importlib.util

    from sera_cli.backends.models import resolve_device, resolve_dtype

    device = resolve_device(config.device)
    name = config.engine
    has_vllm = importlib.util.find_spec("vllm") is not None
    if name == "auto":
        name = "vllm" if device == "cuda" and has_vllm else "hf"
    if name == "vllm" and not has_vllm:
        from sera_cli.backends.engines.vllm import INSTALL_HINT

        raise ConfigError(f"--engine vllm: vllm is not installed ({INSTALL_HINT}, or use --engine hf)")
    dtype = str(resolve_dtype(config.dtype, device)).removeprefix("torch.")
    if name == "hf":
        return {"name": "hf", "dtype": dtype, "device": device, "batch_size": config.batch_size,
                "cache_tokens": config.cache_tokens}
    return {"name": "vllm", "dtype": dtype, "device": device, "tensor_parallel_size": config.tensor_parallel_size,
            "enforce_eager": config.enforce_eager}


def open_engine(config: GenerateConfig, ref, tok, name: str, stops: list[int], tokens: list[list[int]],
                 context: int | None):
    with console.status(f"Loading {ref.spec} ({name} engine)"):
        if name == "vllm":
            from sera_cli.backends.engines.vllm import VLLMEngine

            longest = max(max((len(t) for t in tokens), default=1) + config.max_new_tokens, 256)
            return VLLMEngine(ref, tok, dtype=config.dtype, device=config.device, seed=config.seed,
                              temperature=config.temperature, top_p=config.top_p,
                              max_new_tokens=config.max_new_tokens, stop_ids=stops,
                              tensor_parallel_size=config.tensor_parallel_size,
                              gpu_memory_utilization=config.gpu_memory_utilization,
                              max_model_len=min(longest, context or longest), enforce_eager=config.enforce_eager,
                              trust_remote_code=config.trust_remote_code)
        from sera_cli.backends.engines.hf import HFEngine

        return HFEngine(ref, tok, dtype=config.dtype, device=config.device, batch_size=config.batch_size,
                        cache_tokens=config.cache_tokens,
                        temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens,
                        stop_ids=stops, trust_remote_code=config.trust_remote_code)


class _Work:
    """The chunks of one run: generated on demand, saved in the chunk store as they finish, kept for the end.

    A chunk is keyed by `identity` (model fingerprint, tokenizer, engine, sampling, stop ids), its prompts' ids
    (their random streams) and token ids; a saved chunk with another key is generated again.
    """

    def __init__(self, config: GenerateConfig, store: ChunkStore, prompts: Prompts, start: int, stop: int,
                 tokens: list[list[int]], stops: list[int], tok, identity: dict[str, Any]):
        self.config, self.store, self.prompts, self.start, self.stop = config, store, prompts, start, stop
        self.prompt_tokens, self.stops, self.tok = tokens, stops, tok
        self.chunks = list(range(start, stop, config.chunk_prompts))
        self.keys = {c: chunk_key({"run": identity, "prompt_ids": prompts.ids[c:self._end(c)]},
                                  token_digest(tokens[c - start:self._end(c) - start])) for c in self.chunks}
        self.done: dict[int, pa.Table] = {}
        self.new_tokens = 0
        self.seconds = 0.0
        self.prompts_done = 0.0

    def _end(self, c: int) -> int:
        return min(c + self.config.chunk_prompts, self.stop)

    @staticmethod
    def _file(c: int) -> str:
        return f"chunk-{c:09d}.parquet"

    def run(self, open_engine) -> None:
        todo = self.missing()
        if not todo:
            return
        engine = open_engine()
        total = sum(self._end(c) - c for c in todo)
        with progress(self.config.progress, counts=True) as bar:
            task = bar.add_task(f"generating ({engine.name})", total=total, rate="", unit="prompts")
            t0 = time.perf_counter()
            for c in todo:
                self._chunk(engine, c, bar, task, t0)
        self.seconds = time.perf_counter() - t0

    def missing(self) -> list[int]:
        """The chunks still to generate; those saved by an earlier run with the same key are loaded instead."""
        for c in self.chunks:
            saved = self.store.load(self._file(c), self.keys[c])
            if saved is not None:
                self.done[c] = saved
        return [c for c in self.chunks if c not in self.done]

    def prompts_of(self, c: int) -> tuple[list[str], list[list[int]]]:
        """Chunk `c`'s prompt ids (their random streams) and token ids."""
        return list(self.prompts.ids[c:self._end(c)]), self.prompt_tokens[c - self.start:self._end(c) - self.start]

    def finished(self, c: int, table: pa.Table) -> None:
        """Keep a generated chunk (`CHUNK` rows), saved for a later `--resume`."""
        self.store.save(self._file(c), self.keys[c], table)
        self.done[c] = table

    def _chunk(self, engine, c: int, bar, task, t0: float) -> None:
        self.finished(c, self._samples(engine, c, bar, task, t0))

    def _samples(self, engine, c: int, bar, task, t0: float) -> pa.Table:
        """Chunk `c` generated: its `CHUNK` rows."""
        idx = range(c, self._end(c))
        cfg = self.config
        done_before = self.prompts_done

        def on_batch(generated: list[list[int]], first_round: bool) -> None:
            self.new_tokens += sum(len(trim(g, self.stops, cfg.max_new_tokens)[0]) for g in generated)
            self.prompts_done += len(generated) / cfg.n if first_round else 0
            dt = max(time.perf_counter() - t0, 1e-9)
            rate = f"{self.prompts_done / dt:,.2f} prompts/s ({self.new_tokens / dt:,.0f} new tokens/s)"
            bar.update(task, completed=self.prompts_done, rate=rate)

        def draw(draws) -> list[list[Sample]]:
            reqs = [Request(self.prompt_tokens[i - self.start], d.count, d.seed) for d in draws
                    for i in [idx[d.key]]]
            first = draws[0].round == 0
            out = engine.generate(reqs, lambda g: on_batch(g, first))
            return [[self._sample(g) for g in samples] for samples in out]

        kept, _ = collect([self.prompts.ids[i] for i in idx], cfg.n, cfg.seed, cfg.max_redraws, draw)
        self.prompts_done = done_before + len(idx)
        bar.update(task, completed=self.prompts_done)
        flat = [(k, s.text, j, s.finish_reason, s.ntok) for k, samples in zip(idx, kept, strict=True)
                for j, s in enumerate(samples)]
        return pa.Table.from_pylist([dict(zip(CHUNK.names, row, strict=True)) for row in flat], schema=CHUNK)

    def _sample(self, generated: list[int]) -> Sample:
        ids, finish = trim(generated, self.stops, self.config.max_new_tokens)
        body = ids[:-1] if finish == "stop" and ids and ids[-1] in self.stops else ids
        text = self.tok.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return Sample(text, finish, len(ids))

    def rows(self) -> pa.Table:
        return pa.concat_tables([CHUNK.empty_table()] + [self.done[c] for c in self.chunks])


def chunk_samples(engine, config: GenerateConfig, ids: list[str], tokens: list[list[int]], stops: list[int],
                  tok) -> tuple[pa.Table, int]:
    """One chunk generated as `_Work` generates it (`CHUNK` rows, `index` counted from the chunk's first prompt),
    and its new tokens: what a Ray actor computes (`ray_stages`)."""
    prompts = Prompts(tuple(ids), tuple(ids), tuple(range(len(ids))), "text", 0)  # only the ids are read
    work = _Work(config, None, prompts, 0, len(ids), tokens, stops, tok, identity={})
    with progress(False, counts=True) as bar:
        table = work._samples(engine, 0, bar, bar.add_task("", total=len(ids), rate=""), time.perf_counter())
    return table, work.new_tokens


def _table(inputs: Inputs, prompts: Prompts, rows: pa.Table) -> pa.Table:
    """The candidates table: one row per response, prompt as in the input (string or messages)."""
    from sera_cli.data.contract import with_ids

    index = rows.column("index").to_pylist()
    prompt = inputs.table.column("prompt").take(pa.array([prompts.rows[i] for i in index], pa.int64()))
    table = pa.table({"prompt_id": pa.array([prompts.ids[i] for i in index], pa.string()), "prompt": prompt,
                      **{c: rows.column(c) for c in ("response", "sample_idx", "finish_reason", "ntok")}})
    return with_ids(table).select(list(COLUMNS))


def _score(config: GenerateConfig, table: pa.Table, cluster=None) -> pa.Table:
    """`--score`: every candidate's log-probs and implicit reward, as `sera score` computes them."""
    from sera_cli.stages.score.config import ScoreConfig
    from sera_cli.stages.score.scoring import score_table

    sc = ScoreConfig(inputs=config.inputs, output=config.output, policy=config.policy, ref=config.ref,
                     reward=config.reward, beta=config.beta,
                     dtype=config.dtype, device=config.device, max_length=config.max_length,
                     max_prompt_length=config.max_prompt_length, cache=config.cache, resume=config.resume,
                     trust_remote_code=config.trust_remote_code, progress=config.progress,
                     precision_check=config.precision_check)
    sc.check()  # once, as the entry `score` checks its config
    shard = (provenance.read(table) or {}).get("shard")
    if config.prev_policy:  # Eq. 7 on the candidates: reward = lambda * r_prev + (1 - lambda) * r_now
        from dataclasses import replace

        from sera_cli.data.chunk_store import ChunkStore
        from sera_cli.stages.score.ensemble import ensembled_rewards

        sp = replace(sc, policy=config.prev_policy, ref=config.prev_ref)
        with ChunkStore(config.output, "score-prev", config.resume) as store:  # its own resumable chunks
            before, _ = (cluster.score_table(table, sp, shard, store=store) if cluster else
                         score_table(table, sp, None, shard=shard, store=store))
            store.finish()
        scored, _ = cluster.score_table(table, sc, shard) if cluster else score_table(table, sc, None, shard=shard)
        return ensembled_rewards(scored, before, config.ensemble_lambda, {"policy": config.prev_policy,
                                                                          "ref": config.prev_ref}, config.output)
    scored, _ = cluster.score_table(table, sc, shard) if cluster else score_table(table, sc, inputs=None, shard=shard)
    return scored
