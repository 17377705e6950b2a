"""Tables and the plain-language reading of a locality run (`diffmem.locality.experiment.run_locality`), and the
files it writes: the JSON of every number and docs/locality.md, both atomically."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

from diffmem.formats.safetensors_io import write_atomic
from diffmem.report import markdown_table


def rounded(value, digits: int = 4):
    """`value` with every float rounded to `digits` (JSON-ready, nested dicts and lists included)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item, digits) for item in value]
    return value


def median(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def mean(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


#: Copy rate from which an embedding counts as a trigger of the memorized image (half its fresh generations).
TRIGGER_RATE = 0.5
#: How much larger than its control an agreement must be to count as agreement (differences of a few captions'
#: noise are not).
AGREEMENT_MARGIN = 1.25


def start_kinds(results: dict) -> list[str]:
    return list(dict.fromkeys(results["config"]["starts"]))


def attacks_of(results: dict, kind: str | None = None) -> list[dict]:
    return [a for c in results["captions"] for a in c["attacks"] if kind is None or a["start"] == kind]


def geometry_table(results: dict) -> str:
    rows = []
    for kind in start_kinds(results):
        attacks = attacks_of(results, kind)
        rows.append([
            f"Dori from {kind}", len(attacks), fmt(mean(a["copy_rate"] for a in attacks), 2),
            fmt(mean(a.get("copy_rate_on_nemo") for a in attacks), 2),
            *(fmt(median(a["to_original"][k] for a in attacks)) for k in ("cosine_per_token", "cosine_pooled",
                                                                           "l2_per_token", "l2_pooled")),
            fmt(median(a["start_to_original"]["cosine_per_token"] for a in attacks)),
            fmt(median(a["to_start"]["cosine_per_token"] for a in attacks)),
        ])
    nearest = [c["nearest_other_memorized"] for c in results["captions"] if c["nearest_other_memorized"]]
    if nearest:
        rows.append(["nearest other memorized caption", len(nearest), "", "",
                     *(fmt(median(n[k] for n in nearest)) for k in ("cosine_per_token", "cosine_pooled",
                                                                    "l2_per_token", "l2_pooled")), "", ""])
    for name, s in results["spread"].items():
        rows.append([f"two {name} (median of {s['captions']} captions' pairs)", "", "", "",
                     *(fmt(s[k]["median"]) for k in ("cosine_per_token", "cosine_pooled", "l2_per_token",
                                                     "l2_pooled")), "", ""])
    header = ["embedding vs the memorized prompt", "searches", "copy rate", "copy rate on NeMo model",
              "cosine dist. per token", "cosine dist. pooled", "L2 per token", "L2 pooled",
              "start's cosine dist. per token", "moved from start (cosine per token)"]
    return markdown_table(header, rows)


def convergence_table(results: dict) -> str:
    rows = []
    pairs: dict[tuple[str, str], list[dict]] = {}
    for caption in results["captions"]:
        for pair in caption["convergence"]:
            pairs.setdefault(tuple(pair["starts"]), []).append(pair)
    for (a, b), entries in pairs.items():
        rows.append([f"{a} / {b}", len(entries),
                     fmt(median(e["start"]["cosine_per_token"] for e in entries)),
                     fmt(median(e["found"]["cosine_per_token"] for e in entries)),
                     fmt(median(e["start"]["l2_per_token"] for e in entries)),
                     fmt(median(e["found"]["l2_per_token"] for e in entries))])
    return markdown_table(["pair of starts (same caption)", "pairs", "cosine per token: starts", "found",
                           "L2 per token: starts", "found"], rows)


def activation_table(results: dict) -> str:
    rows = []
    for kind in start_kinds(results):
        entries = [e for c in results["captions"] for e in c["activations"]["adversarial"] if e["start"] == kind]
        rows.append([f"adversarial, {kind} start", len(entries),
                     fmt(mean(e["value"]["cosine_mean"] for e in entries)),
                     fmt(mean(e["value"]["top_jaccard"] for e in entries)),
                     fmt(mean(e["ffn"]["cosine_mean"] for e in entries)),
                     fmt(mean(e["ffn"]["top_jaccard"] for e in entries))])
    for label, value_key, ffn_key in (("another memorized caption", "value_other_memorized", "ffn_other_memorized"),
                                      ("an ordinary caption", "value_ordinary", "ffn_ordinary")):
        value = [c["activations"]["baselines"][value_key] for c in results["captions"]]
        ffn = [c["activations"]["baselines"][ffn_key] for c in results["captions"]]
        value, ffn = [v for v in value if v], [f for f in ffn if f]
        if value:
            rows.append([label, sum(v["prompts"] for v in value), fmt(mean(v["cosine_mean"] for v in value)),
                         fmt(mean(v["top_jaccard"] for v in value)), fmt(mean(f["cosine_mean"] for f in ffn)),
                         fmt(mean(f["top_jaccard"] for f in ffn))])
    chance_value = mean(e["value"]["top_chance"] for c in results["captions"] for e in c["activations"]["adversarial"])
    chance_ffn = mean(e["ffn"]["top_chance"] for c in results["captions"] for e in c["activations"]["adversarial"])
    rows.append(["two random top sets (chance)", "", "", fmt(chance_value), "", fmt(chance_ffn)])
    return markdown_table(["compared with the memorized prompt", "n", "value layers: cosine",
                           "value: top-neuron Jaccard", "feed-forward: cosine", "feed-forward: top-neuron Jaccard"],
                          rows)


def nemo_neuron_table(results: dict) -> str:
    rows = []
    prompt = [c["activations"]["nemo_neurons_prompt"] for c in results["captions"]]
    prompt = [p for p in prompt if p]
    if prompt:
        rows.append(["the memorized prompt", len(prompt), fmt(mean(p["mean_z"] for p in prompt), 2),
                     fmt(mean(p["in_top_z"]["jaccard"] for p in prompt)),
                     fmt(mean(p["in_top_z"]["chance"] for p in prompt)),
                     fmt(median(c["activations"]["prompt_signal"]["unpruned"] for c in results["captions"])),
                     fmt(median(c["activations"]["prompt_signal"]["nemo"] for c in results["captions"]))])
    for kind in start_kinds(results):
        entries = [e for c in results["captions"] for e in c["activations"]["adversarial"] if e["start"] == kind]
        with_nemo = [e for e in entries if "nemo_neurons_mean_z" in e]
        rows.append([f"adversarial, {kind} start", len(entries), fmt(mean(e["nemo_neurons_mean_z"] for e in with_nemo), 2),
                     fmt(mean(e["nemo_neurons_in_top_z"]["jaccard"] for e in with_nemo)),
                     fmt(mean(e["nemo_neurons_in_top_z"]["chance"] for e in with_nemo)),
                     fmt(median(e["signal"] for e in entries)), fmt(median(e["signal_on_nemo"] for e in entries))])
    return markdown_table(["embedding", "n", "mean z of NeMo's neurons", "Jaccard(NeMo's neurons, its top-z neurons)",
                           "chance", f"first-step signal, unpruned (threshold {results['threshold']:.3f})",
                           "signal on the NeMo-pruned model"], rows)


def agreement_rows(entries: Sequence[dict], key: str) -> tuple[float | None, float | None]:
    found = [e[key]["overall"] for e in entries if key in e]
    return mean(f["jaccard"] for f in found), mean(f["chance"] for f in found)


def selection_table(results: dict) -> str:
    selections = [c["selections"] for c in results["captions"]]
    channels = [s["channels"] for s in selections if "channels" in s]
    rows = []
    for key, label in (("nemo_vs_wanda", "NeMo vs Wanda"),
                       ("nemo_vs_random_rows", "NeMo vs random value rows (NeMo's counts)"),
                       ("wanda_vs_random_weights", "Wanda vs random feed-forward weights (Wanda's counts)"),
                       ("nemo_random_vs_wanda_random", "random rows vs random weights")):
        jac, chance = agreement_rows(channels, key)
        rows.append([f"{label}: top residual channels changed", len(channels), fmt(jac), fmt(chance)])
    relocalised = [s["relocalised"] for s in selections if "relocalised" in s]
    for key, label in (("nemo", "NeMo: prompt vs adversarial embedding (value neurons)"),
                       ("wanda", "Wanda: prompt vs adversarial embedding (feed-forward weights)")):
        jac, chance = agreement_rows(relocalised, key)
        if any(key in entry for entry in relocalised):
            rows.append([label, len(relocalised), fmt(jac), fmt(chance)])
    between = results.get("between_captions") or {}
    for key, label in (("nemo", "NeMo: one face's prompt vs another's (value neurons)"),
                       ("wanda", "Wanda: one face's prompt vs another's (feed-forward weights)")):
        if between.get(key):
            rows.append([label, f"{between[key]['pairs']} pairs", fmt(between[key]["jaccard"]),
                         fmt(between[key]["chance"])])
    return markdown_table(["selections compared", "captions", "Jaccard (pooled over layers)", "chance"], rows)


def per_block_table(results: dict) -> str:
    channels = [c["selections"]["channels"]["nemo_vs_wanda"] for c in results["captions"]
                if "channels" in c["selections"]]
    if not channels:
        return "(NeMo or Wanda selected nothing for every caption: no comparison.)"
    rows = []
    for block in channels[0]["layers"]:
        entries = [c["layers"][block] for c in channels]
        rows.append([f"`{block}`", entries[0]["units"], entries[0]["size_a"], fmt(mean(e["jaccard"] for e in entries)),
                     fmt(mean(e["chance"] for e in entries))])
    return markdown_table(["transformer block", "channels", "top channels per method", "NeMo vs Wanda Jaccard",
                           "chance"], rows)


def readings(results: dict) -> list[str]:
    """Plain-language reading of the numbers, each with the rule it applies, so it is regenerated with them."""
    lines = []
    spread_name = next(iter(results["spread"]))
    caption_spread = results["spread"][spread_name]["cosine_per_token"]["median"]
    far = [a for a in attacks_of(results) if a["start"] != "prompt" and a["copy_rate"] >= TRIGGER_RATE]
    others = [a for a in attacks_of(results) if a["start"] != "prompt"]
    if others and not far:
        lines.append(
            f"**Where triggers lie: not testable here.** None of the {len(others)} searches from random or unrelated "
            f"starts found an embedding whose fresh generations copy the face in at least half of the cases, so "
            f"there is no trigger whose position could be compared with the prompt's.")
    elif others:
        distance = median(a["to_original"]["cosine_per_token"] for a in far)
        verdict = "reproduces" if distance > caption_spread else "does not reproduce"
        lines.append(
            f"**Where triggers lie: the world {verdict} the seed's claim.** {len(far)} of {len(others)} searches from "
            f"random or unrelated starts found an embedding whose fresh generations copy the face in at least half "
            f"of the cases; those embeddings lie at a median per-token cosine distance of {fmt(distance)} from the "
            f"memorized prompt, against {fmt(caption_spread)} between two real {spread_name} (rule: the claim holds "
            f"when successful triggers lie farther from the prompt than two real captions lie from each other).")
    pairs = [p for c in results["captions"] for p in c["convergence"]]
    if pairs:
        found = median(p["found"]["cosine_per_token"] for p in pairs)
        start = median(p["start"]["cosine_per_token"] for p in pairs)
        converge = found < 0.5 * start
        lines.append(
            f"**Convergence:** searches for the same face from different starts end at a median per-token cosine "
            f"distance of {fmt(found)} from each other, having started {fmt(start)} apart: they "
            f"{'move into one region' if converge else 'do not converge to one region'} (rule: one region when the "
            f"final distance is under half the starting distance).")
    # Only embeddings that trigger the image count: the claim is about different embeddings of the same image.
    adversarial = [e for c in results["captions"] for a, e in zip(c["attacks"], c["activations"]["adversarial"])
                   if a["start"] != "prompt" and a["copy_rate"] >= TRIGGER_RATE]
    if others and not adversarial:
        lines.append("**Activations and NeMo's neurons: not testable here**, for want of a successful trigger from a "
                     "random or unrelated start.")
    other = [c["activations"]["baselines"]["value_other_memorized"] for c in results["captions"]]
    other = [o for o in other if o]
    if adversarial and other:
        adv_j = mean(e["value"]["top_jaccard"] for e in adversarial)
        adv_f = mean(e["ffn"]["top_jaccard"] for e in adversarial)
        other_j = mean(o["top_jaccard"] for o in other)
        other_f = mean(c["activations"]["baselines"]["ffn_other_memorized"]["top_jaccard"]
                       for c in results["captions"] if c["activations"]["baselines"]["ffn_other_memorized"])
        divergent = adv_j <= other_j
        lines.append(
            f"**Activations: the world {'reproduces' if divergent else 'does not reproduce'} the seed's claim in the "
            f"value layers.** The most active value neurons of adversarial embeddings from random or unrelated starts "
            f"that trigger the face (copy rate >= {TRIGGER_RATE}) overlap the memorized prompt's with Jaccard {fmt(adv_j)}, against {fmt(other_j)} for another memorized "
            f"caption, which triggers a different face (feed-forward neurons: {fmt(adv_f)} against {fmt(other_f)}); "
            f"rule: the claim holds when an embedding that triggers the same image shares no more of the prompt's "
            f"top neurons than a prompt of another image does.")
    with_nemo = [e for e in adversarial if "nemo_neurons_mean_z" in e]
    prompts = [c["activations"]["nemo_neurons_prompt"] for c in results["captions"] if c["activations"]["nemo_neurons_prompt"]]
    if with_nemo and prompts:
        lines.append(
            f"**NeMo's neurons:** the value neurons NeMo localised for the prompts reach a mean z-score of "
            f"{fmt(mean(p['mean_z'] for p in prompts), 2)} under the prompts and {fmt(mean(e['nemo_neurons_mean_z'] for e in with_nemo), 2)} "
            f"under the triggers found from random or unrelated starts; their copy rate on the NeMo-pruned model "
            f"(NeMo pruned for all memorized prompts): {fmt(mean(a.get('copy_rate_on_nemo') for a in far), 2)} "
            f"(unpruned: {fmt(mean(a['copy_rate'] for a in far), 2)}).")
    channels = [c["selections"]["channels"] for c in results["captions"] if "channels" in c["selections"]]
    if channels:
        jac, chance = agreement_rows(channels, "nemo_vs_wanda")
        control = agreement_rows(channels, "nemo_random_vs_wanda_random")[0]
        agree = jac > AGREEMENT_MARGIN * control
        lines.append(
            f"**NeMo vs Wanda: the world {'does not reproduce' if agree else 'reproduces'} the seed's claim.** Their "
            f"weights never overlap (NeMo zeroes value-projection rows, Wanda feed-forward weights), so they are "
            f"compared on the residual channels each pruning changes most for the prompt: Jaccard {fmt(jac)} "
            f"(chance {fmt(chance)}), against {fmt(control)} for random prunings of the same two shapes (as many "
            f"rows and weights per layer, at random) (rule: the methods agree when their Jaccard exceeds the random "
            f"prunings' by more than {AGREEMENT_MARGIN - 1:.0%}).")
    relocalised = [c["selections"]["relocalised"] for c in results["captions"] if "relocalised" in c["selections"]]
    if relocalised:
        nj, nc = agreement_rows(relocalised, "nemo")
        wj, wc = agreement_rows(relocalised, "wanda")
        nemo_part = (f"NeMo run on an adversarial embedding picks value neurons that overlap its neurons for the "
                     f"prompt with Jaccard {fmt(nj)} (chance {fmt(nc)}); " if nj is not None else "")
        between = (results.get("between_captions") or {}).get("wanda")
        if between:
            same = wj > AGREEMENT_MARGIN * between["jaccard"]
            scale = (f", against {fmt(between['jaccard'])} between Wanda's weights for two different faces: the "
                     f"weights Wanda blames {'depend on the image more than on the trigger, against' if same else 'are no more the same for two triggers of one face than for two faces, as'}"
                     f" the seed's claim (rule: same weights when the Jaccard exceeds the two-faces one by more than "
                     f"{AGREEMENT_MARGIN - 1:.0%})")
        else:
            scale = ("; Wanda's overlap between two different faces, the scale this needs (its scores weigh |W|, "
                     "which is the same for every prompt), was not measured in this run")
        lines.append(
            f"**Same image, different trigger:** {nemo_part}Wanda's feed-forward weights for the adversarial embedding "
            f"and for the prompt overlap with Jaccard {fmt(wj)} (chance {fmt(wc)}){scale}.")
    return lines


def markdown(results: dict) -> str:
    """docs/locality.md for one run: what was measured, the tables, the reading."""
    config = results["config"]
    dori, check = config["dori"], config["check"]
    parts = [
        "# Is memorization local? Seed 002's claims measured on the embedded world",
        "",
        "Kowalczuk et al. (2025, \"Finding Dori: Memorization in Text-to-Image Diffusion Models Is Not Local\", seed "
        "002) argue that pruning mitigations such as NeMo and Wanda rest on a false assumption, that memorization "
        "sits in a few neurons or weights: (1) text embeddings that trigger a memorized image are spread over "
        "embedding space, (2) such embeddings drive different activations from the memorized prompt's, and (3) "
        "different pruning methods pick different weights for the same image. `diffmem.locality` runs the "
        "experiments behind these claims on a world model that really memorizes. This page is written by the "
        "command(s) below; every number comes from the JSON they write.",
        "",
        "```",
        results.get("command", "diffmem locality"),
        *([results["between_command"]] if "between_command" in results else []),
        "```",
        "",
        f"Model: {results.get('model', 'a world model')}; "
        f"{len(results['captions'])} of its {len(results['memorized'])} memorized captions studied; Dori with Adam lr {dori['lr']}, batch {dori['batch_size']}, "
        f"{dori['steps']} steps per search, starts {', '.join(config['starts'])} (search j seeded {dori['seed']} + j); "
        f"success judged on {check['generations']} fresh generations per embedding ({check['steps']} DDIM steps, "
        f"guidance {check['guidance']}) with Carlini et al.'s copy test against the training faces; top sets are "
        f"the top {config['top_share']:.0%} of a layer's units; NeMo threshold {results['threshold']:.3f}; "
        f"{results['seconds'] / 60:.1f} minutes of wall time (one torch thread at nice 5 on the shared CPU).",
        "",
        "## Reading",
        "",
        *(f"- {line}" for line in readings(results)),
        "",
        "## 1. Where adversarial embeddings lie",
        "",
        "Distances between an embedding found by Dori and the memorized prompt's own embedding (`[16, 384]` MiniLM "
        "token states): cosine distance and L2 per token position (averaged over the 16 positions) and of the "
        "token-averaged (pooled) embedding; medians over captions. The last rows give the scale: distances between "
        "real captions. Copy rate: share of fresh generations from the embedding that copy the face, on the model "
        "attacked and on the NeMo-pruned model.",
        "",
        geometry_table(results),
        "",
        "Do searches from different starts converge? Median distance between the embeddings found for the same face "
        "from two starts, beside the distance between the two starts:",
        "",
        convergence_table(results),
        "",
        "## 2. How different their activations are",
        "",
        "Value layers (`attn2.to_v`, which see only the text): NeMo's activation `a_j = mean over tokens |v_j|`. "
        "Feed-forward layers (`ff.net.2`): the input norm `||X_j||` of each hidden neuron that Wanda weighs, over "
        f"noisy copies of the memorized face at timesteps {', '.join(map(str, config['timesteps']))} "
        f"({config['noise_draws']} draws each). Per layer, the cosine of the two activation vectors and the Jaccard "
        "of their top neurons, averaged over layers and captions. Baselines: the same comparison between the "
        "memorized prompt and another memorized caption (another face) and an ordinary caption.",
        "",
        activation_table(results),
        "",
        "NeMo's neurons for the memorized prompt, seen from each embedding: their mean z-score against the ordinary "
        "prompts' activation statistics, and the Jaccard between them and the same number of highest-z neurons in "
        "each layer (1 when NeMo's neurons are exactly the embedding's most out-of-distribution ones). Wen et al.'s "
        "first-step signal, which NeMo drives under its threshold for the prompt, for each embedding on the "
        "unpruned and the NeMo-pruned model (NeMo pruned for all memorized prompts at once):",
        "",
        nemo_neuron_table(results),
        "",
        "## 3. How much NeMo and Wanda agree",
        "",
        "NeMo deactivates rows of the cross-attention value projections, Wanda zeroes single weights of the "
        "feed-forward output layers: the two weight sets are disjoint by construction, so a weight-level Jaccard "
        "would be 0 whatever the model does. Their common unit here is the residual stream of each transformer "
        "block, which both the cross-attention and the feed-forward layer write into: for each memorized prompt, "
        "each method's pruning (its selection for that prompt alone) is applied, and the channels of each block's "
        "output that change most (mean |change| over the same noisy inputs as above; top "
        f"{config['top_share']:.0%} per block) are the channels the method acts on. Chance is the Jaccard of random "
        "channel sets of those sizes. Since any perturbation upstream moves the large channels downstream, the "
        "random-pruning rows (the same numbers of rows or weights per layer, at random) are the control to beat. "
        "The last rows run a method again with an adversarial embedding of the same face in place of the prompt "
        "and compare its selections in its own units; the same comparison between its selections for two "
        "different faces' prompts gives the scale.",
        "",
        selection_table(results),
        "",
        "Per transformer block, NeMo vs Wanda (mean over captions):",
        "",
        per_block_table(results),
        "",
        "## Limits",
        "",
        "- Five memorized faces on a 3 M-parameter model with 16-token MiniLM embeddings, not Stable Diffusion; a "
        "budget for one shared CPU core (the searches, generations and NeMo runs above).",
        "- Copy rates come from few generations per embedding; one generation moves a rate by "
        f"{1 / max(1, check['generations']):.2f}.",
        "- The residual-channel comparison measures where each pruning changes the computation, not which weights "
        "store the face; it is the unit on which two methods that prune different layers can agree at all.",
        "",
        "Library: `diffmem.locality.run_locality(unet, inputs, LocalityConfig())`, statistics in "
        "`diffmem.locality.functional`; tests `tests/test_locality.py`.",
        "",
    ]
    return "\n".join(parts)


def write_results(results: dict, json_path: str | Path | None, markdown_path: str | Path | None) -> None:
    """Write the JSON of a run and its markdown page (each when its path is given), atomically
    (`results["command"]` is the command the page names)."""
    if json_path is not None:
        write_atomic((json.dumps(rounded(results), indent=1, sort_keys=False) + "\n").encode(), json_path)
    if markdown_path is not None:
        write_atomic(markdown(rounded(results)).encode(), markdown_path)
