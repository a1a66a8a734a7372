// One-line argument checks, as flash-attention writes them. Messages match the Python side's wording.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#define CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor, got ", (x).device())
#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define CHECK_SAME_DEVICE(x, y) \
  TORCH_CHECK((x).device() == (y).device(), "all tensors must be on one device, got " #x " on ", (x).device(), \
              ", " #y " on ", (y).device())
#define CHECK_INDEX(x) \
  TORCH_CHECK((x).scalar_type() == at::kInt || (x).scalar_type() == at::kLong, \
              #x " must be an int32 or int64 tensor, got ", (x).scalar_type())
#define CHECK_INPUT(x) \
  CHECK_CUDA(x);       \
  CHECK_CONTIGUOUS(x)
