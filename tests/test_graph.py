import numpy as np
import pytest

from skelemix.graph import LAYOUTS, NTU, NW_UCLA, Graph, Layout, hop_distance


def test_default_graph_is_the_three_subset_agcn_graph():
    A = Graph().A
    assert A.shape == (3, 25, 25)
    np.testing.assert_allclose(A.sum(axis=(1, 2)), [25, 24, 20])
    assert [(a != 0).sum() for a in A] == [25, 24, 24]
    np.testing.assert_array_equal(A[0], np.eye(25))
    # Subset 1 brings each child its parent: A[1][parent, child] = 1; the root column is empty.
    assert A[1][20, 1] == 1 and A[1][:, 20].sum() == 0
    # Subset 2 averages children: the root (index 20) has 4 children, index 0 has 2.
    np.testing.assert_allclose(A[2][[1, 2, 4, 8], 20], 0.25)
    np.testing.assert_allclose(A[2][[12, 16], 0], 0.5)
    leaves = [3, 15, 19, 21, 23]
    assert np.all(A[2][:, leaves] == 0)


def test_stgcn_partitions_match_the_original_graph():
    # docs/DESIGN.md 2.1: the ST-GCN spatial partition's subset sums are 8.95 / 13.3 / 2.75.
    np.testing.assert_allclose(Graph(strategy="spatial").A.sum(axis=(1, 2)), [8.95, 13.3, 2.75])
    assert Graph(strategy="distance").A.shape == (2, 25, 25)
    np.testing.assert_allclose(Graph(strategy="uniform").A.sum(), 25)


def test_hop_distance():
    hop = hop_distance(NTU, max_hop=2)
    assert hop[20, 20] == 0 and hop[20, 1] == 1 and hop[20, 0] == 2 and hop[20, 3] == 2
    assert np.isinf(hop[20, 6])  # elbow -> shoulder -> spine is 3 hops


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layouts_are_trees_partitioned_into_five_parts(layout):
    lay = LAYOUTS[layout]
    assert len(lay.body_parts) == 5
    assert sorted(j for part in lay.body_parts for j in part) == list(range(lay.num_joints))
    parents = lay.parents()
    assert parents[lay.root] == lay.root
    for strategy in ("agcn", "spatial"):
        A = Graph(layout, strategy).A
        assert A.shape[1:] == (lay.num_joints, lay.num_joints)
    assert Graph(NW_UCLA).A.sum(axis=(1, 2)).tolist() == [20, 19, 15]


def test_ntu_body_parts_are_the_official_ones():
    assert NTU.body_parts[0] == (3, 2, 20, 1, 0)
    assert [len(p) for p in NTU.body_parts] == [5, 6, 6, 4, 4]


def test_bad_layout_and_strategy_are_named():
    with pytest.raises(ValueError, match="strategy must be one of"):
        Graph(strategy="nope")
    with pytest.raises(ValueError, match="layout must be one of"):
        Graph("openpose")
    with pytest.raises(ValueError, match="partition"):
        Layout("bad", 3, ((1, 0), (2, 0)), 0, ((0, 1),), ("a",))
