/* The checksums of a device write in one call: xxh3_64 of each block of a buffer.
 *
 * blockdev/checksums.py imports this as the extension module `_xxh3blocks` and hashes
 * a write's blocks in one call (the GIL released for large ones) instead of calling
 * python-xxhash once per 4 KiB block (256 calls per MiB).
 * The values are xxHash's own XXH3_64bits (seed 0), as python-xxhash computes them:
 * the on-disk checksum format does not depend on which one ran, and a test compares
 * the two.
 *
 * Built by scripts/setup.sh into .build/xxh3blocks/ from this one file, compiled four
 * times: once per vector width (XXH3_BLOCKS_VARIANT set, with -msse2, -mavx2 or
 * -mavx512f, so that xxhash.h picks its SSE2, AVX2 or AVX-512 code), and once without
 * XXH3_BLOCKS_VARIANT for the module, which picks the widest variant the CPU runs (as
 * xxHash's own xxh_x86dispatch.c does).
 */
#include <stddef.h>
#include <stdint.h>

typedef void (*blocks_fn)(const unsigned char *data, size_t block_size, size_t count,
                          uint64_t *out);

#ifdef XXH3_BLOCKS_VARIANT

#define XXH_INLINE_ALL
#include <xxhash.h>

#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)

void CAT(sluice_xxh3_blocks_, XXH3_BLOCKS_VARIANT)(const unsigned char *data,
                                                   size_t block_size, size_t count,
                                                   uint64_t *out)
{
    for (size_t i = 0; i < count; i++)
        out[i] = XXH3_64bits(data + i * block_size, block_size);
}

#else

#define PY_SSIZE_T_CLEAN
#include <Python.h>

void sluice_xxh3_blocks_sse2(const unsigned char *, size_t, size_t, uint64_t *);
void sluice_xxh3_blocks_avx2(const unsigned char *, size_t, size_t, uint64_t *);
void sluice_xxh3_blocks_avx512(const unsigned char *, size_t, size_t, uint64_t *);

static blocks_fn chosen;
static const char *chosen_name;

static void choose(void)
{
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
        chosen = sluice_xxh3_blocks_avx512;
        chosen_name = "avx512";
    } else if (__builtin_cpu_supports("avx2")) {
        chosen = sluice_xxh3_blocks_avx2;
        chosen_name = "avx2";
    } else {
        chosen = sluice_xxh3_blocks_sse2;
        chosen_name = "sse2";
    }
}

/* Below this many bytes the GIL stays held: releasing it costs more than it lends. */
#define RELEASE_GIL_BYTES (64 * 1024)

/* hash_blocks(data, block_size, out): out[i] = xxh3_64 of block i of data. */
static PyObject *hash_blocks(PyObject *self, PyObject *args)
{
    Py_buffer data, out;
    Py_ssize_t bs;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nw*", &data, &bs, &out))
        return NULL;
    PyObject *ret = NULL;
    if (bs <= 0 || data.len % bs) {
        PyErr_Format(PyExc_ValueError, "%zd bytes are not whole blocks of %zd",
                     data.len, bs);
    } else if (out.len != data.len / bs * 8) {
        PyErr_Format(PyExc_ValueError, "output of %zd bytes for %zd blocks",
                     out.len, data.len / bs);
    } else {
        size_t count = (size_t)(data.len / bs);
        if (data.len >= RELEASE_GIL_BYTES) {
            Py_BEGIN_ALLOW_THREADS
            chosen(data.buf, (size_t)bs, count, out.buf);
            Py_END_ALLOW_THREADS
        } else {
            chosen(data.buf, (size_t)bs, count, out.buf);
        }
        ret = Py_None;
        Py_INCREF(ret);
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    return ret;
}

static PyObject *variant(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyUnicode_FromString(chosen_name);
}

static PyMethodDef methods[] = {
    {"hash_blocks", hash_blocks, METH_VARARGS,
     "hash_blocks(data, block_size, out): out[i] = xxh3_64 of block i of data "
     "(out: a writable buffer of len(data) // block_size uint64s)"},
    {"variant", variant, METH_NOARGS, "the variant in use: sse2, avx2 or avx512"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_xxh3blocks",
    "xxh3_64 of each block of a buffer in one call (blockdev/xxh3blocks.c)", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__xxh3blocks(void)
{
    choose();
    return PyModule_Create(&module);
}

#endif
