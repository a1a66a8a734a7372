# Sourced by scripts/demo.sh and scripts/test.sh before an install whose extras include llama-cpp: llama-cpp-python
# builds llama.cpp from source with cmake and the C++ compiler (4½ minutes on 2 cores, once: pip caches the
# built wheel and later installs take seconds). The install runs without build isolation, so its build backend
# comes first. Only the library is built (no tests, examples, server, multimodal tools or curl), for any x86-64
# with AVX2 rather than this machine's exact CPU, so that the cached wheel serves another machine of the same kind.
python -m pip install --quiet "scikit-build-core[pyproject]>=0.9"
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
