"""Metrics and protocols against hand-computed cases, chance levels, writers and readers."""

import itertools
import json
import math

import pytest
import torch

from cirlab.data.base import CIRSplit, Query
from cirlab.evaluation import metrics as M
from cirlab.evaluation import submission
from cirlab.evaluation.protocols import (
    chance_levels,
    combine_splits,
    evaluate_rankings,
    evaluate_similarity,
)
from cirlab.evaluation.submission import (
    rankings_from_similarity,
    read_predictions,
    write_circo_submission,
    write_cirr_submission,
    write_fashioniq_predictions,
)
from cirlab.features.similarity import dot_similarity


def make_split(dataset, queries, gallery, exclude):
    return CIRSplit(dataset, "val", list(queries), list(gallery), lambda _: [], exclude)


def q(qid, ref, target, positives=None, subset=None):
    return Query(qid, ref, ("text",), target, tuple(positives or (target,)), tuple(subset) if subset else None)


def by_rank(order, gallery_size):
    """A similarity row whose ranking is ``order`` (gallery indices, best first)."""
    row = torch.zeros(gallery_size)
    for rank, i in enumerate(order):
        row[i] = gallery_size - rank
    return row


# --- hand-computed cases ---------------------------------------------------------------------

# 3 queries x 6 gallery images. Sorted by similarity:
#   q0 (ref 0, target 2): 0 .9, 2 .8, 3 .3, 4 .2, 1 .1, 5 .0 -> target rank 2; ref removed: rank 1
#   q1 (ref 1, target 5): 1 .95, 4 .7, 3 .6, 0 .5, 2 .4, 5 .3 -> target rank 6; ref removed: rank 5
#   q2 (ref 3, target 4): 3 .9, 4 .8, 5 .7, 2 .3, 1 .2, 0 .1 -> target rank 2; ref removed: rank 1
SIM = torch.tensor([[0.9, 0.1, 0.8, 0.3, 0.2, 0.0],
                    [0.5, 0.95, 0.4, 0.6, 0.7, 0.3],
                    [0.1, 0.2, 0.3, 0.9, 0.8, 0.7]])
REFS, TARGETS = torch.tensor([0, 1, 3]), [[2], [5], [4]]


def test_recall_without_reference_exclusion():
    ranking = M.rank_gallery(SIM, 6)
    assert ranking[0].tolist() == [0, 2, 3, 4, 1, 5]
    hits = M.hits_from_ranking(ranking, TARGETS)
    # target ranks 2, 6, 2
    assert M.recall_at_k(hits, [1, 2, 5, 6]) == pytest.approx({1: 0.0, 2: 200 / 3, 5: 200 / 3, 6: 100.0})


def test_recall_with_reference_exclusion():
    ranking = M.rank_gallery(SIM, 6, exclude=REFS)
    # The reference is deleted, not demoted into the list: 5 candidates, then padding.
    assert ranking.tolist() == [[2, 3, 4, 1, 5, -1], [4, 3, 0, 2, 5, -1], [4, 5, 2, 1, 0, -1]]
    hits = M.hits_from_ranking(ranking, TARGETS)
    # target ranks 1, 5, 1
    assert M.recall_at_k(hits, [1, 2, 5]) == pytest.approx({1: 200 / 3, 2: 200 / 3, 5: 100.0})
    # A boolean positive mask gives the same hits as index lists.
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[[0, 1, 2], [2, 5, 4]] = True
    assert torch.equal(M.hits_from_ranking(ranking, mask), hits)


def test_protocol_cirr_recall_from_similarity_and_from_rankings():
    gallery = [f"g{i}" for i in range(6)]
    queries = [q(str(i), gallery[r], gallery[t[0]]) for i, (r, t) in enumerate(zip(REFS.tolist(), TARGETS))]
    split = make_split("cirr", queries, gallery, exclude=True)
    expected = {"R@1": 200 / 3, "R@5": 100.0, "R@10": 100.0, "R@50": 100.0}  # ranks 1, 5, 1 of 5 candidates
    assert evaluate_similarity(split, SIM) == pytest.approx(expected)  # no member sets: no Rs, no Avg
    ranked, subset = rankings_from_similarity(split, SIM)
    assert subset is None and ranked["1"] == ["g4", "g3", "g0", "g2", "g5"]
    assert evaluate_rankings(split, ranked) == pytest.approx(expected)


def test_subset_recall_skips_the_reference_even_when_it_scores_highest():
    # 8 images, member sets of 4 (reference included).
    # q0: members ref 0 (.99), target 2 (.6), 5 (.7), 7 (.1): without the reference 5, 2, 7 -> target rank 2
    #     (rank 3 if the reference were kept).
    # q1: members ref 1 (.4), target 3 (.5), 4 (.3), 6 (.2): 3, 4, 6 -> target rank 1.
    sim = torch.zeros(2, 8)
    sim[0, [0, 2, 5, 7]] = torch.tensor([0.99, 0.6, 0.7, 0.1])
    sim[1, [1, 3, 4, 6]] = torch.tensor([0.4, 0.5, 0.3, 0.2])
    members = torch.tensor([[0, 2, 5, 7], [1, 3, 4, 6]])
    exclude = torch.tensor([0, 1])
    assert M.rank_subset(sim, members, exclude).tolist() == [[5, 2, 7, -1], [3, 4, 6, -1]]
    rs = M.subset_recall(sim, members, exclude, positives=[[2], [3]])
    assert rs == pytest.approx({1: 50.0, 2: 100.0, 3: 100.0})


def test_cirr_protocol_avg_is_mean_of_r5_and_rs1():
    # 8 images, sims by rank; q0 ref g0 target g3 (full-gallery rank 4 after deleting g0),
    # q1 ref g7 target g6 (rank 7 of 7).
    gallery = [f"g{i}" for i in range(8)]
    members = ["g0", "g1", "g2", "g3", "g4", "g5"], ["g7", "g6", "g5", "g4", "g3", "g2"]
    split = make_split("cirr", [q("0", "g0", "g3", subset=members[0]), q("1", "g7", "g6", subset=members[1])],
                       gallery, exclude=True)
    sim = torch.stack([by_rank([0, 1, 2, 4, 3, 5, 6, 7], 8), by_rank([7, 0, 1, 2, 3, 4, 5, 6], 8)])
    # q0: list 1 2 4 3 ... -> rank 4; subset without g0: 1 2 4 3 5 -> rank 4
    # q1: list 0 1 2 3 4 5 6 -> rank 7; subset without g7: 2 3 4 5 6 -> rank 5
    out = evaluate_similarity(split, sim)
    assert out == pytest.approx({"R@1": 0.0, "R@5": 50.0, "R@10": 100.0, "R@50": 100.0,
                                 "Rs@1": 0.0, "Rs@2": 0.0, "Rs@3": 0.0, "Avg": 25.0})


def test_fashioniq_per_category_average_and_no_reference_exclusion():
    def category(name, refs, targets):
        gallery = [f"{name}{i}" for i in range(60)]
        queries = [q(f"{name}-{j}", gallery[r], gallery[t]) for j, (r, t) in enumerate(zip(refs, targets))]
        return make_split("fashioniq", queries, gallery, exclude=False)

    # Similarity falls with the gallery index, so rank = index + 1 and the reference keeps its place.
    dress = category("dress", refs=[0, 1, 2], targets=[4, 19, 54])  # ranks 5, 20, 55
    shirt = category("shirt", refs=[0, 5], targets=[10, 49])  # ranks 11 (10 if the ref were removed), 50
    sims = [-torch.arange(60.0).expand(len(s.queries), 60) for s in (dress, shirt)]
    results = [evaluate_similarity(s, sim) for s, sim in zip((dress, shirt), sims)]
    assert results[0] == pytest.approx({"dress/R@10": 100 / 3, "dress/R@50": 200 / 3})
    assert results[1] == pytest.approx({"shirt/R@10": 0.0, "shirt/R@50": 100.0})
    combined = combine_splits([dress, shirt], results)
    assert combined["avg/R@10"] == pytest.approx(50 / 3)  # (33.3 + 0) / 2
    assert combined["avg/R@50"] == pytest.approx(250 / 3)  # (66.7 + 100) / 2
    assert combined["avg"] == pytest.approx(50.0)  # (16.7 + 83.3) / 2


def test_average_precision_uses_min_of_gt_count_and_k():
    # A: 7 GTs, hits at ranks 1 3 5 6 8 -> precisions 1, 2/3, 3/5, 4/6, 5/8
    #    AP@5 = (1 + 2/3 + 3/5) / min(7, 5) = 0.45333, AP@10 = (... + 4/6 + 5/8) / 7 = 0.50833
    # B: 2 GTs, hits at ranks 2 10 -> precisions 1/2, 2/10: AP@5 = 0.5 / 2 = 0.25, AP@10 = 0.7 / 2 = 0.35
    hits = torch.zeros(2, 10, dtype=torch.bool)
    hits[0, [0, 2, 4, 5, 7]] = True
    hits[1, [1, 9]] = True
    aps = M.average_precision_at_k(hits, torch.tensor([7, 2]), [5, 10])
    assert aps[5] == pytest.approx((0.453333333 + 0.25) / 2 * 100)
    assert aps[10] == pytest.approx((3.558333333 / 7 + 0.35) / 2 * 100)


def test_circo_protocol_map_on_all_gts_recall_on_target_only():
    gallery = [str(i) for i in range(60)]
    # Identical rankings (rank = index + 1), reference kept. A: GTs at ranks 1 3 5 6 8 (+56, 59
    # outside the top 50), target "2" at rank 3. B: GTs "1" and "9", target "9" at rank 10.
    a = q("0", "1", "2", positives=["2", "0", "4", "5", "7", "55", "58"])
    b = q("1", "3", "9", positives=["9", "1"])
    split = make_split("circo", [a, b], gallery, exclude=False)
    out = evaluate_similarity(split, -torch.arange(60.0).expand(2, 60))
    ap10 = (3.558333333 / 7 + 0.35) / 2 * 100
    assert out == pytest.approx({"mAP@5": (0.453333333 + 0.25) / 2 * 100, "mAP@10": ap10, "mAP@25": ap10,
                                 "mAP@50": ap10, "R@1": 0.0, "R@5": 50.0, "R@10": 100.0, "R@50": 100.0})
    # R@1 is 0 although A's top-1 is a ground truth: Recall counts target_img_id only.


def test_shapes_counts_any_identical_scene_as_a_hit():
    gallery = [f"s{i}" for i in range(8)]
    # q0: ref s0 first (deleted), then s5 (a positive that is not the target s3) -> hit at rank 1.
    # q1: ref s1 deleted; s7, s4, s6 -> first positive (s6; target s2 comes later) at rank 3.
    queries = [q("0", "s0", "s3", positives=["s3", "s5"]), q("1", "s1", "s2", positives=["s2", "s6"])]
    split = make_split("shapes", queries, gallery, exclude=True)
    sim = torch.stack([by_rank([0, 5, 3, 1, 2, 4, 6, 7], 8), by_rank([1, 7, 4, 6, 0, 2, 3, 5], 8)])
    assert evaluate_similarity(split, sim) == pytest.approx({"R@1": 50.0, "R@5": 100.0, "R@10": 100.0, "R@50": 100.0})


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="NaN"):
        M.rank_gallery(torch.tensor([[0.0, float("nan")]]), 1)
    with pytest.raises(ValueError, match="ranking depth"):
        M.recall_at_k(torch.zeros(2, 5, dtype=torch.bool), [10])
    gallery = ["a", "b", "c"]
    test_split = make_split("cirr", [Query("1", "a", ("t",))], gallery, exclude=True)
    with pytest.raises(ValueError, match="no target"):
        evaluate_similarity(test_split, torch.zeros(1, 3))
    split = make_split("cirr", [q("1", "a", "b")], gallery, exclude=True)
    with pytest.raises(ValueError, match="shape"):
        evaluate_similarity(split, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="reference"):
        evaluate_rankings(split, {"1": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="top 2"):
        evaluate_rankings(split, {"1": ["b"]})
    with pytest.raises(ValueError, match="1 of 1 queries"):
        evaluate_rankings(split, {"2": ["b", "c"]})


# --- vectorised == per-query reference implementation -------------------------------------


def naive_metrics(sim, refs, positives, targets, members, n_gt, exclude, recall_on_target=False):
    """Per-query loops, written from the protocol text only."""
    out = {"R": {k: 0.0 for k in (1, 5, 10, 50)}, "Rs": {k: 0.0 for k in (1, 2, 3)},
           "AP": {k: [] for k in (5, 10, 25, 50)}}
    Q, G = sim.shape
    for i in range(Q):
        order = sorted(range(G), key=lambda j: -sim[i, j].item())
        if exclude:
            order.remove(refs[i])
        hitset = {targets[i]} if recall_on_target else set(positives[i])
        for k in out["R"]:
            out["R"][k] += any(j in hitset for j in order[:k]) / Q * 100
        if members is not None:
            sub = [j for j in order if j in members[i]]
            for k in out["Rs"]:
                out["Rs"][k] += any(j in hitset for j in sub[:k]) / Q * 100
        for k in out["AP"]:
            found, total = 0, 0.0
            for rank, j in enumerate(order[:k], start=1):
                if j in positives[i]:
                    found += 1
                    total += found / rank
            out["AP"][k].append(total / min(n_gt[i], k))
    return out


def random_problem(seed, Q, G, dataset, exclude, n_pos=(1, 4), subsets=True):
    g = torch.Generator().manual_seed(seed)
    gallery = [f"i{j}" for j in range(G)]
    queries, refs, positives, members = [], [], [], []
    for i in range(Q):
        perm = torch.randperm(G, generator=g).tolist()
        n = int(torch.randint(n_pos[0], n_pos[1], (1,), generator=g))
        ref, pos = perm[0], perm[1:1 + n]
        mem = perm[:1] + perm[1:2] + perm[1 + n:5 + n]  # reference, target, 4 others
        refs.append(ref), positives.append(pos), members.append(mem)
        queries.append(q(str(i), gallery[ref], gallery[pos[0]], [gallery[p] for p in pos],
                         [gallery[m] for m in mem] if subsets else None))
    return make_split(dataset, queries, gallery, exclude), refs, positives, members


@pytest.mark.parametrize("dataset,exclude", [("cirr", True), ("shapes", True), ("circo", False)])
def test_vectorised_equals_per_query_reference(dataset, exclude):
    split, refs, positives, members = random_problem(1, Q=40, G=70, dataset=dataset, exclude=exclude,
                                                     subsets=dataset == "cirr")
    sim = torch.rand(40, 70, generator=torch.Generator().manual_seed(2))
    circo = dataset == "circo"
    ref = naive_metrics(sim, refs, positives, [p[0] for p in positives], members if dataset == "cirr" else None,
                        [len(p) for p in positives], exclude, recall_on_target=circo)
    expected = {f"R@{k}": v for k, v in ref["R"].items()}
    if circo:
        expected.update({f"mAP@{k}": sum(v) / len(v) * 100 for k, v in ref["AP"].items()})
    if dataset == "cirr":
        expected.update({f"Rs@{k}": v for k, v in ref["Rs"].items()})
        expected["Avg"] = (expected["R@5"] + expected["Rs@1"]) / 2
    assert evaluate_similarity(split, sim) == pytest.approx(expected)
    ranked, subset = rankings_from_similarity(split, sim)
    assert evaluate_rankings(split, ranked, subset) == pytest.approx(expected)


# --- chance levels --------------------------------------------------------------------------


def test_chance_levels_match_closed_forms():
    split, *_ = random_problem(3, Q=30, G=100, dataset="shapes", exclude=True, n_pos=(3, 4), subsets=False)
    levels = chance_levels(split)
    # 99 candidates, 3 positives: 1 - C(96, K) / C(99, K)
    for k in (1, 5, 10, 50):
        assert levels[f"R@{k}"] == pytest.approx((1 - math.comb(96, k) / math.comb(99, k)) * 100)
    cirr, *_ = random_problem(3, Q=30, G=100, dataset="cirr", exclude=True, n_pos=(1, 2))
    levels = chance_levels(cirr)
    assert levels["R@5"] == pytest.approx(5 / 99 * 100) and levels["R@50"] == pytest.approx(50 / 99 * 100)
    assert (levels["Rs@1"], levels["Rs@2"], levels["Rs@3"]) == pytest.approx((20.0, 40.0, 60.0))
    assert levels["Avg"] == pytest.approx((5 / 99 * 100 + 20) / 2)


def test_chance_map_equals_the_mean_over_every_permutation():
    # 7 images, 3 GTs of which 2 are in the gallery (the denominator still counts 3).
    gallery = [str(i) for i in range(7)]
    split = make_split("circo", [q("0", "6", "1", positives=["1", "4", "99"])], gallery, exclude=False)
    levels = chance_levels(split)
    perms = list(itertools.permutations(range(7)))
    for k in (5, 10):
        total = 0.0
        for order in perms:
            found, ap = 0, 0.0
            for rank, j in enumerate(order[:k], start=1):
                if j in (1, 4):
                    found += 1
                    ap += found / rank
            total += ap / min(3, k)
        assert levels[f"mAP@{k}"] == pytest.approx(total / len(perms) * 100)
    assert levels["R@5"] == pytest.approx(5 / 7 * 100)  # the target alone: K / n


def ap_sample(split, ranked):
    """Per-query AP@K values, to size the tolerance of the mAP chance check from the data itself."""
    aps = {k: [] for k in (5, 10, 25, 50)}
    for query in split.queries:
        for k in aps:
            found, total = 0, 0.0
            for rank, x in enumerate(ranked[query.qid][:k], start=1):
                if x in query.positives:
                    found += 1
                    total += found / rank
            aps[k].append(total / min(len(query.positives), k))
    return aps


@pytest.mark.parametrize("dataset,exclude", [("cirr", True), ("shapes", True), ("circo", False)])
def test_random_predictions_land_at_chance(tmp_path, dataset, exclude):
    Q, G = 5000, 500
    split, *_ = random_problem(4, Q=Q, G=G, dataset=dataset, exclude=exclude,
                               n_pos=(1, 2) if dataset == "cirr" else (3, 8), subsets=dataset == "cirr")
    sim = torch.rand(Q, G, generator=torch.Generator().manual_seed(5))
    ranked, subset = rankings_from_similarity(split, sim)
    if dataset == "cirr":  # through the submission files, as a user would
        paths = write_cirr_submission(tmp_path, "random", ranked, subset, split=split)
        ranked, subset = (read_predictions(p)[1] for p in paths)
    got, chance = evaluate_rankings(split, ranked, subset), chance_levels(split)
    assert got.keys() == chance.keys()
    aps = ap_sample(split, ranked) if dataset == "circo" else {}
    for name, expected in chance.items():
        if name.startswith("mAP"):
            values = torch.tensor(aps[int(name[4:])], dtype=torch.double)
            se = values.std().item() / math.sqrt(Q) * 100
        elif name == "Avg":
            se = max(math.sqrt(p * (100 - p) / Q) for p in (chance["R@5"], chance["Rs@1"]))
        else:
            se = math.sqrt(expected * (100 - expected) / Q)
        assert abs(got[name] - expected) < 4 * se, (name, got[name], expected, se)
    if dataset == "cirr":  # 4 standard errors still separate 20% from the 1-in-6 of keeping the reference
        assert 4 * math.sqrt(20 * 80 / Q) < 100 / 5 - 100 / 6


# --- prediction files -----------------------------------------------------------------------


def cirr_fixture(n_queries=4, n_gallery=60, qid=lambda i: str(100 + i)):
    split, *_ = random_problem(7, Q=n_queries, G=n_gallery, dataset="cirr", exclude=True, n_pos=(1, 2))
    split.queries = [Query(qid(i), x.reference, x.captions, x.target, x.positives, x.subset)
                     for i, x in enumerate(split.queries)]
    return split


def test_cirr_submission_round_trip_without_reference(tmp_path):
    split = cirr_fixture(qid=lambda i: f"00{i}")  # keys must come out as str(int(pairid))
    sim = torch.rand(4, 60)
    for i, x in enumerate(split.queries):  # the reference scores highest everywhere
        sim[i, split.gallery.index(x.reference)] = 10.0
    ranked, subset = rankings_from_similarity(split, sim)
    recall, recall_subset = write_cirr_submission(tmp_path, "run1", ranked, subset, split=split)
    assert (recall.name, recall_subset.name) == ("recall_submission_run1.json", "recall_subset_submission_run1.json")
    meta, back = read_predictions(recall)
    subset_meta, subset_back = read_predictions(recall_subset)
    assert meta == {"version": "rc2", "metric": "recall"} and subset_meta["metric"] == "recall_subset"
    assert set(back) == {"0", "1", "2", "3"}
    for i, x in enumerate(split.queries):
        assert back[str(i)] == ranked[x.qid][:50] and len(back[str(i)]) == 50
        assert subset_back[str(i)] == subset[x.qid][:3]
        assert x.reference not in back[str(i)] and x.reference not in subset_back[str(i)]


def test_cirr_writer_refuses_bad_rankings_and_writes_nothing(tmp_path, monkeypatch):
    split = cirr_fixture()
    ranked, subset = rankings_from_similarity(split, torch.rand(4, 60))
    first = split.queries[0]
    with_ref = {**ranked, first.qid: [first.reference] + ranked[first.qid][:-1]}
    with pytest.raises(ValueError, match="reference"):
        write_cirr_submission(tmp_path, "x", with_ref, subset, split=split)
    with pytest.raises(ValueError, match="3 of 4 queries"):
        write_cirr_submission(tmp_path, "x", {first.qid: ranked[first.qid]}, subset, split=split)
    monkeypatch.setattr(submission, "MAX_SUBMISSION_BYTES", 500)
    with pytest.raises(ValueError, match="over the server's limit of 500"):
        write_cirr_submission(tmp_path, "x", ranked, subset, split=split)
    assert list(tmp_path.iterdir()) == []


def test_real_sized_cirr_submission_fits_under_5_mb(tmp_path):
    # CIRR test1: 4148 queries, names like "test1-1005-3-img0"; the server takes at most 5 MB.
    gallery = [f"test1-{i // 4}-{i % 4}-img{i % 2}" for i in range(2200)]
    queries = [q(str(i), gallery[i % 2000], gallery[i % 2000 + 1], subset=gallery[i % 2000:i % 2000 + 6])
               for i in range(4148)]
    split = make_split("cirr", queries, gallery, exclude=True)
    ranked, subset = rankings_from_similarity(split, torch.rand(4148, 2200))
    recall, _ = write_cirr_submission(tmp_path, "big", ranked, subset, split=split)
    assert recall.stat().st_size < submission.MAX_SUBMISSION_BYTES


def test_circo_and_fashioniq_files_round_trip(tmp_path):
    gallery = [str(i) for i in range(80)]
    circo = make_split("circo", [q("0", "1", "2", ["2", "3"]), q("1", "4", "5")], gallery, exclude=False)
    ranked, _ = rankings_from_similarity(circo, torch.rand(2, 80))
    path = write_circo_submission(tmp_path / "circo.json", ranked, split=circo)
    raw = json.loads(path.read_text())
    assert set(raw) == {"0", "1"} and all(isinstance(x, int) for x in raw["0"]) and len(raw["0"]) == 50
    assert read_predictions(path) == ({}, ranked)

    dress = make_split("fashioniq", [q("dress-0", "d0", "d1"), q("dress-1", "d2", "d3")],
                       [f"d{i}" for i in range(55)], exclude=False)
    shirt = make_split("fashioniq", [q("shirt-0", "s0", "s1")], [f"s{i}" for i in range(30)], exclude=False)
    ranked = {**rankings_from_similarity(dress, torch.rand(2, 55))[0],
              **rankings_from_similarity(shirt, torch.rand(1, 30))[0]}
    path = write_fashioniq_predictions(tmp_path / "fiq.json", ranked, splits=[dress, shirt])
    meta, back = read_predictions(path, qids=["dress-0", "dress-1", "shirt-0"])
    assert meta == {"version": "fashioniq", "metric": "recall"} and back == ranked


@pytest.mark.parametrize("content,message", [
    ([["a"]], "expected a JSON object"),
    ({"version": "rc2", "1": "a"}, "'1' should be a list"),
    ({"1": ["a", "b", "a"]}, "'1' holds 'a' twice"),
    ({"1": ["a"], "2": ["b"], "3": ["c"]}, "1 keys are not query ids"),
    ({"1": ["a"]}, "1 of 2 queries are missing"),
])
def test_reader_errors_name_file_and_key(tmp_path, content, message):
    path = tmp_path / "preds.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message) as e:
        read_predictions(path, qids=["1", "2"])
    assert str(path) in str(e.value)


def test_dot_similarity_stays_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    q, g = torch.randn(8, 64), torch.randn(50, 64)
    g[1] = g[0] + 1e-3 * torch.randn(64)  # a near duplicate: bf16 cannot tell the two apart
    with torch.autocast("cpu", dtype=torch.bfloat16):
        coarse, sim = q @ g.T, dot_similarity(q, g)
    assert coarse.dtype == torch.bfloat16 and sim.dtype == torch.float32
    assert torch.equal(sim, q @ g.T)
    assert (sim[:, 0] != sim[:, 1]).all() and (coarse[:, 0] == coarse[:, 1]).float().mean() > 0.5
