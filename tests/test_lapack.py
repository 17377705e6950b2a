"""The LAPACK routines called through ctypes (diffmem.lapack) against numpy's float64 results."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from diffmem.lapack import gram_upper, leading_eigenpairs


@pytest.mark.parametrize("shape", [(7, 19), (19, 7), (12, 12), (1, 5)])
def test_gram_upper_is_the_smaller_gram_matrix(shape):
    matrix = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    gram, left = gram_upper(matrix)
    assert left == (shape[0] <= shape[1]) and gram.flags.f_contiguous
    full = matrix @ matrix.T if left else matrix.T @ matrix
    assert gram.shape == full.shape
    np.testing.assert_allclose(np.triu(gram), np.triu(full), rtol=1e-5, atol=1e-5)


def test_gram_upper_of_a_non_contiguous_float64_matrix():
    matrix = np.random.default_rng(1).standard_normal((20, 9))[:, ::2]  # strided, float64
    gram, left = gram_upper(matrix)
    assert not left
    np.testing.assert_allclose(np.triu(gram), np.triu(matrix.T @ matrix), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kept", [1, 5, 40])
def test_leading_eigenpairs_match_a_float64_eigendecomposition(kept):
    matrix = np.random.default_rng(2).standard_normal((40, 90)).astype(np.float32)
    gram, _ = gram_upper(matrix)
    seen = []
    values, vectors = leading_eigenpairs(gram, lambda found: seen.append(found.copy()) or kept)
    want_values, want_vectors = np.linalg.eigh(matrix.astype(np.float64) @ matrix.T.astype(np.float64))
    want_values, want_vectors = want_values[::-1], want_vectors[:, ::-1]
    np.testing.assert_allclose(values, want_values, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(seen[0], values)  # the count was chosen from the whole spectrum, descending
    assert vectors.shape == (40, kept)
    # Each vector is the float64 one up to its sign, and the gram matrix is left unchanged.
    np.testing.assert_allclose(np.abs(np.sum(vectors * want_vectors[:, :kept], axis=0)), 1.0, atol=1e-4)
    np.testing.assert_array_equal(gram, gram_upper(matrix)[0])


def test_leading_eigenpairs_clip_the_count_and_run_side_by_side():
    matrices = [np.random.default_rng(seed).standard_normal((30, 30)).astype(np.float32) for seed in range(4)]
    grams = [gram_upper(m)[0] for m in matrices]
    serial = [leading_eigenpairs(g, lambda found: 100) for g in grams]  # more than there are: all 30
    assert all(vectors.shape == (30, 30) for _, vectors in serial)
    assert leading_eigenpairs(grams[0], lambda found: 0)[1].shape == (30, 1)  # at least one
    with ThreadPoolExecutor(2) as pool:  # the routines run without the GIL, on separate buffers
        parallel = list(pool.map(lambda g: leading_eigenpairs(g, lambda found: 100), grams))
    for (v1, w1), (v2, w2) in zip(serial, parallel):
        np.testing.assert_array_equal(v1, v2)
        np.testing.assert_array_equal(w1, w2)
