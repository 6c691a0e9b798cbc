"""Markdown tables from the suite's JSON: printed by the suite, pasted by tools/perf_readme.py.

Throughput is images per second (batch / median step time); ratios are
speed ratios (>1 means tljax is faster). The tljax column a ratio uses is
the platform's default implementation ('fast' on CPU, 'xla' elsewhere).
With --rounds, a ratio also shows the range of the per-round ratios (each
round's tljax median against the same round's peer median), so a reader
sees how far one round could have moved the pooled figure.
"""

from __future__ import annotations

MODES = ('inference', 'head_step', 'full_step', 'cached_head_step')
MODE_NAMES = {'inference': 'inference', 'head_step': 'head-only step',
              'full_step': 'full fine-tune step', 'cached_head_step': 'head step, cached features'}
# Training-step FLOPs relative to one forward pass, for MFU (backward ≈ 2 forwards).
FLOP_FACTOR = {'inference': 1.0, 'head_step': 1.0, 'full_step': 3.0}


def seconds(timing: dict | None) -> float | None:
  return timing.get('median_s') if isinstance(timing, dict) else None


def _fmt(v: float | None, digits: int = 1) -> str:
  return 'n/a' if v is None else f'{v:,.{digits}f}'


def _ratio(a: float | None, b: float | None) -> str:
  return 'n/a' if not a or not b else f'{b / a:.2f}×'


def round_ratios(ours: dict | None, ref: dict | None) -> list[float]:
  """Peer ÷ tljax time per round; empty unless both ran every round."""
  a = ours.get('round_medians', []) if isinstance(ours, dict) else []
  b = ref.get('round_medians', []) if isinstance(ref, dict) else []
  return [y / x for x, y in zip(a, b)] if len(a) == len(b) > 1 else []


def _ratio_cell(ours: dict | None, ref: dict | None) -> str:
  cell = _ratio(seconds(ours), seconds(ref))
  per_round = round_ratios(ours, ref)
  return f'{cell} ({min(per_round):.2f}–{max(per_round):.2f})' if per_round else cell


def frameworks(rows: list[dict]) -> list[str]:
  order = ['tljax-fast', 'tljax-xla', 'tljax-auto', 'torch-eager', 'torch-compile', 'keras']
  seen = {f for row in rows for f in row.get('results', {})}
  return [f for f in order if f in seen] + sorted(seen - set(order))


def default_tljax(meta: dict) -> str:
  return 'tljax-xla' if meta.get('gpu') else 'tljax-fast'


def model_table(result: dict) -> list[str]:
  rows, meta = result.get('models', []), result.get('meta', {})
  if not rows:
    return []
  fws = frameworks(rows)
  ours = default_tljax(meta)
  refs = [f for f in ('torch-eager', 'torch-compile', 'keras') if f in fws]
  peak = meta.get('peak_tflops')
  head = ['model', 'dtype', 'mode'] + [f'{f} img/s' for f in fws] + [f'{ours} ÷ {r}' for r in refs]
  if peak:
    head += [f'MFU {f}' for f in fws if f.startswith(('tljax', 'torch'))]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for row in rows:
    flops = (row.get('flops') or {}).get('inference')
    for mode in MODES:
      timings = {f: row['results'].get(f, {}).get(mode) for f in fws}
      times = {f: seconds(t) for f, t in timings.items()}
      if all(t is None for t in times.values()):
        continue
      cells = [row['model'], row['dtype'], MODE_NAMES[mode]]
      cells += [_fmt(row['batch'] / t if t else None) for t in times.values()]
      cells += [_ratio_cell(timings.get(ours), timings.get(r)) for r in refs]
      if peak:
        for f in fws:
          if f.startswith(('tljax', 'torch')):
            t = times[f]
            mfu = (flops * FLOP_FACTOR[mode] / t / (peak * 1e12) * 100
                   if t and flops and mode in FLOP_FACTOR else None)
            cells.append('n/a' if mfu is None else f'{mfu:.1f}%')
      lines.append('| ' + ' | '.join(cells) + ' |')
  return lines


def summary_table(result: dict) -> list[str]:
  rows, meta = result.get('models', []), result.get('meta', {})
  ours = default_tljax(meta)
  lines = ['| model | dtype | GFLOP/img (fwd) | head step ÷ forward | cached head step speed-up | '
           'Adam state, backbone frozen | Adam state, full |', '|---|---|---|---|---|---|---|']
  for row in rows:
    res = row['results'].get(ours, {})
    fwd, head, cached = (seconds(res.get(m))
                         for m in ('inference', 'head_step', 'cached_head_step'))
    state = row.get('opt_state_bytes') or {}
    flops = (row.get('flops') or {}).get('inference')
    mb = lambda b: 'n/a' if b is None else f'{b / 2**20:,.1f} MiB'
    lines.append('| ' + ' | '.join([
        row['model'], row['dtype'], _fmt(flops / row['batch'] / 1e9 if flops else None, 2),
        'n/a' if not (fwd and head) else f'{head / fwd:.2f}',
        'n/a' if not (head and cached) else f'{head / cached:.1f}×',
        mb(state.get('head_only')), mb(state.get('full'))]) + ' |')
  return lines


def micro_table(result: dict) -> list[str]:
  rows = result.get('micro', [])
  if not rows:
    return []
  lines = [f'| conv (batch {rows[0]["shape"]["batch"]}) | dtype | pass | XLA GFLOP/s | '
           'tljax fast GFLOP/s | torch GFLOP/s | fast ÷ XLA | fast ÷ torch |',
           '|---|---|---|---|---|---|---|---|']
  for row in rows:
    for mode in ('forward', 'forward_backward'):
      t = {f: seconds(row['results'].get(f, {}).get(mode))
           for f in ('jax-xla', 'jax-fast', 'torch')}
      gf = {f: row['flops'][mode] / v / 1e9 if v else None for f, v in t.items()}
      lines.append('| ' + ' | '.join([
          row['case'], row['dtype'], 'fwd' if mode == 'forward' else 'fwd+bwd',
          _fmt(gf['jax-xla']), _fmt(gf['jax-fast']), _fmt(gf['torch']),
          _ratio(t['jax-fast'], t['jax-xla']), _ratio(t['jax-fast'], t['torch'])]) + ' |')
  return lines


def meta_lines(meta: dict) -> list[str]:
  versions = ', '.join(f'{k} {v}' for k, v in sorted(meta.get('versions', {}).items()) if v)
  device = meta.get('gpu_name') or meta.get('cpu', 'unknown CPU')
  lines = [f'- Date: {meta.get("date", "?")}; machine: {device}; '
           f'{meta.get("threads", "?")} threads ({meta.get("cpus", "?")} CPUs visible); '
           f'{meta.get("platform", "")}',
           f'- Versions: {versions}',
           f'- Batch {meta.get("batch")}, {meta.get("iters")} timed iterations after '
           f'{meta.get("warmup")} warm-up (median)'
           + (f', in each of {meta["rounds"]} rounds with the frameworks interleaved (median of all '
              'rounds\' samples; per-round ratio range in brackets)'
              if meta.get('rounds', 1) > 1 else '')
           + '; malloc tuning: '
           f'{"on" if meta.get("malloc_tuned") else "off"}'
           + (' (tcmalloc, every framework)' if meta.get('host_allocator') == 'tcmalloc' else
              ' (with the huge-block cache, every framework)' if meta.get('host_block_cache') else '')
           + '; '
           + (f'C++ CPU kernels: {meta["native_kernels"]}; ' if meta.get('native_kernels') and
              not meta.get('gpu') else '')
           + f'git {meta.get("git", "?")}',
           f'- Command: `{meta.get("command", "")}`']
  if meta.get('skipped'):
    lines.append(f'- Not run (time budget spent): {", ".join(meta["skipped"])}')
  if meta.get('peak_tflops'):
    lines.append(f'- MFU against a peak of {meta["peak_tflops"]} TFLOP/s; training FLOPs = 3 × '
                 'forward FLOPs (XLA cost analysis of the lowered forward pass)')
  lines.extend(f'- Note: {note}' for note in meta.get('notes', ()))
  return lines


def markdown(result: dict) -> str:
  parts = [meta_lines(result.get('meta', {}))]
  for title, table in (('Models', model_table(result)), ('Transfer-learning costs',
                                                         summary_table(result)),
                       ('Single convolutions', micro_table(result))):
    if table and len(table) > 2:
      parts.append([f'**{title}**', ''] + table)
  return '\n\n'.join('\n'.join(p) for p in parts) + '\n'
