// The difference between two job specs: every field path (`training.optimizer.lr`)
// whose value differs, with both values. A list is one value (`model.hidden`);
// a field only one spec has shows as missing (undefined) in the other.

/** {path: value} for every leaf of a JSON object (lists and nulls are leaves). */
export function flatten(value, prefix = "", out = {}) {
  if (value !== null && typeof value === "object" && !Array.isArray(value) && Object.keys(value).length) {
    for (const [k, v] of Object.entries(value)) flatten(v, prefix ? `${prefix}.${k}` : k, out);
  } else if (prefix) {
    out[prefix] = value;
  }
  return out;
}

/** [{path, a, b}] for each path whose values differ, sorted by path. */
export function specDiff(a, b) {
  const fa = flatten(a ?? {}), fb = flatten(b ?? {});
  const paths = [...new Set([...Object.keys(fa), ...Object.keys(fb)])].sort();
  return paths.filter(p => JSON.stringify(fa[p]) !== JSON.stringify(fb[p])).map(p => ({ path: p, a: fa[p], b: fb[p] }));
}
