"""The self-checks' meaning of "the same to the bit": equal in type, shape and every value, and as many."""

import torch

from speedups.exact import same_tensor_lists, same_tensors


def test_same_tensors_needs_the_type_every_value_and_the_count():
    a = torch.tensor([1.0, 2.0, float("inf")])
    assert same_tensors([a, a[:1]], [a.clone(), a[:1].clone()])
    assert not same_tensors([a], [a.double()])  # equal values, other type
    assert not same_tensors([a], [torch.nextafter(a, torch.zeros(3))])  # one unit in the last place
    assert not same_tensors([a], [a[:2]])
    assert not same_tensors([a, a], [a])
    assert not same_tensors([torch.tensor([float("nan")])], [torch.tensor([float("nan")])])  # as torch.equal


def test_same_tensor_lists_compares_each_list():
    a, b = torch.arange(3), torch.arange(4)
    assert same_tensor_lists([[a], [a, b]], [[a.clone()], [a.clone(), b.clone()]])
    assert not same_tensor_lists([[a], [a, b]], [[a], [a]])
    assert not same_tensor_lists([[a]], [[a], [b]])
