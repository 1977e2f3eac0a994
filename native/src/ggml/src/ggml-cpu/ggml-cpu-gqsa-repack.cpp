// CPU_GQSA: the CPU backend's buffer type for repacked gqsa4 and gqsa3 weights (gqsa-gguf).
//
// llama.cpp offers the CPU backend's extra buffer types to every weight; this one accepts the
// gqsa4 and gqsa3 weights of a mul_mat whose rows keep at least 8 blocks, on builds with the AVX2
// kernels. Loading such a weight repacks each row into superblocks and a tail of n_kept % 8 blocks
// as stored (ggml_gqsa_sb_repack, ggml_gqsa3_sb_repack: same bytes, arranged for the kernels; see
// "Repacked weights" in ggml-cpu-gqsa.c), and its mul_mats run ggml_gqsa_mul_mat_sb. Other weights
// stay in the plain CPU buffer and run ggml_gqsa_mul_mat on the file layout. GGML_GQSA_REPACK=0 in
// the environment turns repacking off (for comparisons).
#include "ggml-cpu-gqsa-repack.h"

#include "ggml-backend-impl.h"
#include "ggml-cpu-gqsa.h"
#include "ggml-cpu.h"
#include "ggml-gqsa.h"
#include "ggml-impl.h"
#include "traits.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

bool gqsa_repack_enabled() {
    const char * env = std::getenv("GGML_GQSA_REPACK");
    return ggml_gqsa_sb_available() && !(env && std::strcmp(env, "0") == 0);
}

int gqsa_n_kept(const ggml_tensor * t) {
    return (int) (t->ne[0] / GQSA_GROUP_SIZE);
}

class gqsa_tensor_traits : public ggml::cpu::tensor_traits {
    bool work_size(int n_threads, const ggml_tensor * op, size_t & size) override {
        GGML_UNUSED(n_threads);
        size = ggml_gqsa_sb_work_size(op);
        return true;
    }

    bool compute_forward(ggml_compute_params * params, ggml_tensor * op) override {
        if (op->op != GGML_OP_MUL_MAT) {
            return false;
        }
        ggml_gqsa_mul_mat_sb(params, op);
        return true;
    }
};

gqsa_tensor_traits gqsa_traits;

class gqsa_extra_buffer_type : public ggml::cpu::extra_buffer_type {
    bool supports_op(ggml_backend_dev_t, const ggml_tensor * op) override {
        const ggml_tensor * w = op->src[0];
        if (op->op != GGML_OP_MUL_MAT || w == nullptr || w->buffer == nullptr ||
            w->buffer->buft != ggml_backend_cpu_gqsa_buffer_type()) {
            return false;
        }
        if (op->src[1]->buffer && !ggml_backend_buft_is_host(op->src[1]->buffer->buft)) {
            return false;
        }
        return ggml_gqsa_sb_supports_mul_mat(op);
    }

    ggml::cpu::tensor_traits * get_tensor_traits(const ggml_tensor * op) override {
        if (op->op == GGML_OP_MUL_MAT && op->src[0]->buffer &&
            op->src[0]->buffer->buft == ggml_backend_cpu_gqsa_buffer_type()) {
            return &gqsa_traits;
        }
        return nullptr;
    }
};

enum ggml_status gqsa_buffer_init_tensor(ggml_backend_buffer_t buffer, ggml_tensor * tensor) {
    GGML_UNUSED(buffer);
    // only weights whose rows split into superblocks can live here (supports_op checked the rest)
    if (!ggml_gqsa_is_type(tensor->type) || !ggml_gqsa_sb_supported(gqsa_n_kept(tensor)) ||
        !ggml_is_contiguous(tensor)) {
        GGML_LOG_ERROR("%s: tensor '%s' cannot be repacked into gqsa superblocks\n", __func__, tensor->name);
        return GGML_STATUS_FAILED;
    }
    return GGML_STATUS_SUCCESS;
}

void gqsa_buffer_set_tensor(ggml_backend_buffer_t buffer, ggml_tensor * tensor, const void * data, size_t offset,
                            size_t size) {
    GGML_UNUSED(buffer);
    GGML_ASSERT(offset == 0 && size == ggml_nbytes(tensor) && "gqsa superblocks are written whole");
    if (tensor->type == GGML_TYPE_GQSA3) {
        ggml_gqsa3_sb_repack(data, tensor->data, gqsa_n_kept(tensor), ggml_nrows(tensor));
    } else {
        ggml_gqsa_sb_repack(data, tensor->data, gqsa_n_kept(tensor), ggml_nrows(tensor));
    }
}

void gqsa_buffer_get_tensor(ggml_backend_buffer_t buffer, const ggml_tensor * tensor, void * data, size_t offset,
                            size_t size) {
    GGML_UNUSED(buffer);
    GGML_ASSERT(offset == 0 && size == ggml_nbytes(tensor) && "gqsa superblocks are read whole");
    if (tensor->type == GGML_TYPE_GQSA3) {
        ggml_gqsa3_sb_unpack(tensor->data, data, gqsa_n_kept(tensor), ggml_nrows(tensor));
    } else {
        ggml_gqsa_sb_unpack(tensor->data, data, gqsa_n_kept(tensor), ggml_nrows(tensor));
    }
}

const char * gqsa_buft_get_name(ggml_backend_buffer_type_t buft) {
    GGML_UNUSED(buft);
    return "CPU_GQSA";
}

ggml_backend_buffer_t gqsa_buft_alloc_buffer(ggml_backend_buffer_type_t buft, size_t size) {
    ggml_backend_buffer_t buffer = ggml_backend_buft_alloc_buffer(ggml_backend_cpu_buffer_type(), size);
    if (buffer == nullptr) {
        return nullptr;
    }
    buffer->buft              = buft;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    // The kernels stream these weights once per token: with transparent huge pages (where the
    // system allows them on request) the stream crosses far fewer TLB entries. Advice only: the
    // pages are not touched yet, and a refusal changes nothing.
    {
        const uintptr_t page = 2u << 20;
        const uintptr_t base = (uintptr_t) ggml_backend_buffer_get_base(buffer);
        const uintptr_t beg  = (base + page - 1) & ~(page - 1);
        const uintptr_t end  = (base + size) & ~(page - 1);
        if (end > beg) {
            madvise((void *) beg, end - beg, MADV_HUGEPAGE);
        }
    }
#endif
    buffer->iface.init_tensor = gqsa_buffer_init_tensor;
    buffer->iface.set_tensor  = gqsa_buffer_set_tensor;
    buffer->iface.get_tensor  = gqsa_buffer_get_tensor;
    buffer->iface.cpy_tensor  = nullptr;
    return buffer;
}

size_t gqsa_buft_get_alignment(ggml_backend_buffer_type_t buft) {
    GGML_UNUSED(buft);
    return 64;
}

}  // namespace

ggml_backend_buffer_type_t ggml_backend_cpu_gqsa_buffer_type(void) {
    static struct ggml_backend_buffer_type buft = {
        /* .iface    = */ {
            /* .get_name         = */ gqsa_buft_get_name,
            /* .alloc_buffer     = */ gqsa_buft_alloc_buffer,
            /* .get_alignment    = */ gqsa_buft_get_alignment,
            /* .get_max_size     = */ nullptr,   // SIZE_MAX
            /* .get_alloc_size   = */ nullptr,   // ggml_nbytes: superblocks take the file's bytes
            /* .is_host          = */ nullptr,
        },
        /* .device   = */ ggml_backend_reg_dev_get(ggml_backend_cpu_reg(), 0),
        /* .context  = */ new gqsa_extra_buffer_type(),
    };
    static const bool enabled = gqsa_repack_enabled();
    return enabled ? &buft : nullptr;
}
