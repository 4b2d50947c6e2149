"""The EMA codebook: nearest code, straight-through gradient, EMA update, restarts, chunking."""

from __future__ import annotations

import pytest
import torch

from bladdergen.vqgan.codebook import Codebook


def _codebook(codes: list[list[float]], **kwargs) -> Codebook:
    book = Codebook(len(codes), len(codes[0]), **kwargs)
    with torch.no_grad():
        book.embeddings.copy_(torch.tensor(codes))
        book.embed_sum.copy_(torch.tensor(codes))
        book.cluster_size.fill_(1.0)
        book.initialized.fill_(True)
    return book


def _latent(vectors: list[list[float]]) -> torch.Tensor:
    """(N, E) vectors -> (1, E, N, 1, 1) latent."""
    return torch.tensor(vectors).t()[None, :, :, None, None].contiguous()


def test_lookup_picks_the_nearest_code_and_returns_it_exactly():
    book = _codebook([[0.0, 0.0], [1.0, 1.0], [-2.0, 0.5]]).eval()
    z_q, indices = book.lookup(_latent([[0.9, 0.8], [-1.5, 0.0], [0.1, -0.2]]))
    assert indices.flatten().tolist() == [1, 2, 0]
    assert torch.equal(z_q[0, :, 1, 0, 0], torch.tensor([-2.0, 0.5]))


def test_straight_through_gradient_passes_to_the_encoder_output_unchanged():
    book = _codebook([[0.0, 0.0], [1.0, 1.0]]).eval()
    z_e = _latent([[0.9, 0.8], [0.2, 0.1]]).requires_grad_(True)
    out = book(z_e)
    weights = torch.tensor([1.0, 2.0])[None, :, None, None, None]
    (out.z_q * weights).sum().backward()
    # d/dz_e of sum(w * (z_e + sg(q - z_e))) is w everywhere
    assert torch.allclose(z_e.grad, weights.expand_as(z_e))
    assert torch.equal(out.z_q.detach()[0, :, 0, 0, 0], torch.tensor([1.0, 1.0]))


def test_ema_update_moves_codes_towards_the_mean_of_their_assigned_vectors():
    book = _codebook([[0.0, 0.0], [10.0, 10.0]], decay=0.5, eps=0.0, restart_threshold=0.0)
    book.train()
    book(_latent([[1.0, 0.0], [3.0, 2.0], [9.0, 9.0]]))
    # code 0: N = 0.5*1 + 0.5*2 = 1.5; sum = 0.5*(0,0) + 0.5*(4,2) = (2,1); mean = (4/3, 2/3)
    # code 1: N = 0.5*1 + 0.5*1 = 1.0; sum = 0.5*(10,10) + 0.5*(9,9) = (9.5,9.5)
    # Laplace smoothing with eps 0 keeps N; e = sum / N
    assert torch.allclose(book.cluster_size, torch.tensor([1.5, 1.0]))
    assert torch.allclose(book.embeddings[0], torch.tensor([4.0 / 3.0, 2.0 / 3.0]))
    assert torch.allclose(book.embeddings[1], torch.tensor([9.5, 9.5]))


def test_eval_mode_never_changes_the_codebook():
    book = _codebook([[0.0, 0.0], [1.0, 1.0]]).eval()
    before = {k: v.clone() for k, v in book.state_dict().items()}
    book(_latent([[0.9, 0.8], [5.0, 5.0]]))
    book.lookup(_latent([[0.9, 0.8]]))
    for key, value in book.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_dead_codes_are_restarted_at_encoder_outputs():
    torch.manual_seed(0)
    # code 1 is far from every vector: it gets no assignments and its count decays below 1
    book = _codebook([[0.0, 0.0], [100.0, 100.0]], decay=0.5, restart_threshold=1.0)
    book.train()
    vectors = [[0.1, 0.2], [0.3, -0.1], [-0.2, 0.0], [0.0, 0.1]]
    book(_latent(vectors))
    restarted = book.embeddings[1]
    distances = (torch.tensor(vectors) - restarted).norm(dim=1)
    assert distances.min() < 1e-6  # sits exactly on one of the batch's encoder vectors
    assert book.cluster_size[1] >= 1.0


def test_first_training_batch_initialises_codes_from_encoder_outputs_and_sets_the_flag():
    torch.manual_seed(0)
    # decay ~1: the EMA step that follows the init in the same pass barely moves the codes
    book = Codebook(4, 3, decay=1.0 - 1e-7)
    book.train()
    vectors = torch.randn(10, 3)
    book(vectors.t()[None, :, :, None, None])
    assert bool(book.initialized)
    for code in book.embeddings:
        assert (vectors - code).norm(dim=1).min() < 1e-4


def test_initialised_flag_is_part_of_the_state_dict():
    book = Codebook(4, 3)
    assert "initialized" in book.state_dict()
    fresh = Codebook(4, 3)
    book.initialized.fill_(True)
    fresh.load_state_dict(book.state_dict())
    assert bool(fresh.initialized)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_search_equals_the_unchunked_one(chunk):
    torch.manual_seed(1)
    codes = torch.randn(50, 8)
    flat = torch.randn(300, 8)
    book = Codebook(50, 8, chunk=chunk)
    book.embeddings.copy_(codes)
    expected = torch.cdist(flat, codes).argmin(dim=1)
    assert torch.equal(book.nearest(flat), expected)


def test_training_pass_returns_the_codes_as_they_were_before_the_ema_update():
    book = _codebook([[0.0, 0.0], [10.0, 10.0]], decay=0.5, restart_threshold=0.0)
    book.train()
    out = book(_latent([[1.0, 0.0], [9.0, 9.0]]))
    assert torch.equal(out.z_q.detach()[0, :, 0, 0, 0], torch.tensor([0.0, 0.0]))
    assert torch.equal(out.z_q.detach()[0, :, 1, 0, 0], torch.tensor([10.0, 10.0]))
    assert not torch.equal(book.embeddings[0], torch.tensor([0.0, 0.0]))  # it did move
