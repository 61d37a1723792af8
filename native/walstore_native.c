/*
 * walstore_native.c: CRC32C, record batch encoding, durable vectored writes, the segment
 * scanner and a u64 -> u64 hash map. The record format is described in walstore_native.h.
 *
 * Built by native/build_native.py (cffi, API mode) with -std=gnu11; the SSE4.2 CRC path
 * is compiled through a target attribute and picked at load time, so one binary runs on
 * any x86_64 (and the table path everywhere else).
 */
#define _GNU_SOURCE
#include "walstore_native.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>
#include <fcntl.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define WS_HAVE_X86_CRC 1
#include <nmmintrin.h>
#endif

/* ---- little-endian loads and stores (the compiler turns these into single moves) ---- */

static inline uint16_t ld16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

static inline uint32_t ld32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

static inline uint64_t ld64(const uint8_t *p) { return ld32(p) | ((uint64_t)ld32(p + 4) << 32); }

static inline void st32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static inline void st64(uint8_t *p, uint64_t v)
{
    st32(p, (uint32_t)v);
    st32(p + 4, (uint32_t)(v >> 32));
}

static inline size_t record_size(uint32_t body_len)
{
    return WS_RECORD_HEADER_BYTES + (((size_t)body_len + 7) & ~(size_t)7);
}

/* ---- CRC32C (Castagnoli, reflected polynomial 0x82F63B78) ---- */

static uint32_t crc_table[8][256];
static int crc_hw;

/* Runs once when the shared object is loaded, before any caller can race on the tables. */
__attribute__((constructor)) static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
#ifdef WS_HAVE_X86_CRC
    __builtin_cpu_init();
    crc_hw = __builtin_cpu_supports("sse4.2");
#endif
}

/* Slicing-by-8 over the raw (not inverted) register. */
static uint32_t crc_update_sw(uint32_t c, const uint8_t *p, size_t len)
{
    while (len >= 8) {
        uint64_t w = ld64(p) ^ c;
        c = crc_table[7][w & 0xff] ^ crc_table[6][(w >> 8) & 0xff] ^
            crc_table[5][(w >> 16) & 0xff] ^ crc_table[4][(w >> 24) & 0xff] ^
            crc_table[3][(w >> 32) & 0xff] ^ crc_table[2][(w >> 40) & 0xff] ^
            crc_table[1][(w >> 48) & 0xff] ^ crc_table[0][w >> 56];
        p += 8;
        len -= 8;
    }
    while (len--)
        c = (c >> 8) ^ crc_table[0][(c ^ *p++) & 0xff];
    return c;
}

#ifdef WS_HAVE_X86_CRC
__attribute__((target("sse4.2"))) static uint32_t crc_update_hw(uint32_t c, const uint8_t *p,
                                                                size_t len)
{
    uint64_t c64 = c;
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c64 = _mm_crc32_u64(c64, w);
        p += 8;
        len -= 8;
    }
    c = (uint32_t)c64;
    while (len--)
        c = _mm_crc32_u8(c, *p++);
    return c;
}
#endif

static inline uint32_t crc_update(uint32_t c, const uint8_t *p, size_t len)
{
#ifdef WS_HAVE_X86_CRC
    if (crc_hw)
        return crc_update_hw(c, p, len);
#endif
    return crc_update_sw(c, p, len);
}

uint32_t ws_crc32c(uint32_t crc, const uint8_t *buf, size_t len)
{
    return ~crc_update(~crc, buf, len);
}

uint32_t ws_crc32c_sw(uint32_t crc, const uint8_t *buf, size_t len)
{
    return ~crc_update_sw(~crc, buf, len);
}

int ws_crc32c_hw_available(void) { return crc_hw; }

/* The header and body are contiguous, so this is two CRC runs skipping the crc field. */
static uint32_t record_crc(const uint8_t *h, uint32_t body_len)
{
    uint32_t c = crc_update(0xFFFFFFFFu, h, 4);
    c = crc_update(c, h + 8, WS_RECORD_HEADER_BYTES - 8 + (size_t)body_len);
    return ~c;
}

/* ---- encoding ---- */

int ws_encode_batch(const uint8_t *bodies, const uint32_t *body_lens, const uint8_t *kinds,
                    const uint8_t *flags, size_t n, uint64_t epoch, uint64_t first_index,
                    uint8_t *out, size_t out_cap, size_t *out_len)
{
    if (out_len == NULL)
        return -EINVAL;
    *out_len = 0;
    if (epoch == 0 || first_index == 0)
        return -EINVAL;
    if (n > 0 && first_index > UINT64_MAX - (n - 1))
        return -EOVERFLOW;

    /* Validate everything before writing anything, so a failure leaves out untouched. */
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (body_lens[i] > WS_MAX_RECORD_BODY_BYTES)
            return -EMSGSIZE;
        if (kinds[i] == 0 || kinds[i] > WS_KIND_MAX)
            return -EINVAL;
        if (flags != NULL && (flags[i] & ~WS_FLAG_BATCH_END))
            return -EINVAL;
        size_t rs = record_size(body_lens[i]);
        if (total > SIZE_MAX - rs)
            return -EOVERFLOW;
        total += rs;
    }
    *out_len = total;
    if (total > out_cap)
        return -ENOBUFS;

    uint8_t *h = out;
    const uint8_t *body = bodies;
    for (size_t i = 0; i < n; i++) {
        uint32_t bl = body_lens[i];
        size_t rs = record_size(bl);
        st32(h, bl);
        h[8] = kinds[i];
        h[9] = flags != NULL ? flags[i] : 0;
        memset(h + 10, 0, 6);
        st64(h + 16, epoch);
        st64(h + 24, first_index + i);
        if (bl)
            memcpy(h + WS_RECORD_HEADER_BYTES, body, bl);
        memset(h + WS_RECORD_HEADER_BYTES + bl, 0, rs - WS_RECORD_HEADER_BYTES - bl);
        st32(h + 4, record_crc(h, bl));
        body += bl;
        h += rs;
    }
    return 0;
}

/* ---- durable writes ---- */

/* Enough iovecs per syscall to cover any group-commit batch, well under IOV_MAX (1024). */
#define WS_IOV_BATCH 256

int ws_pwritev_sync(int fd, int64_t offset, const uint8_t *const *bufs, const size_t *lens,
                    int nbufs, int do_sync, int *failed_step)
{
    int step_dummy;
    int *step = failed_step != NULL ? failed_step : &step_dummy;
    *step = WS_STEP_NONE;
    if (offset < 0 || nbufs < 0)
        return -EINVAL;

    struct iovec iov[WS_IOV_BATCH];
    int bi = 0;      /* first buffer not fully written */
    size_t boff = 0; /* bytes of bufs[bi] already written */
    off_t pos = (off_t)offset;
    while (bi < nbufs) {
        int cnt = 0;
        for (int j = bi; j < nbufs && cnt < WS_IOV_BATCH; j++) {
            size_t skip = j == bi ? boff : 0;
            if (lens[j] == skip)
                continue;
            iov[cnt].iov_base = (void *)(bufs[j] + skip);
            iov[cnt].iov_len = lens[j] - skip;
            cnt++;
        }
        if (cnt == 0)
            break; /* only empty buffers left */
        ssize_t w = pwritev(fd, iov, cnt, pos);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            *step = WS_STEP_WRITE;
            return -errno;
        }
        if (w == 0) {
            /* No progress and no error: retrying could spin forever. */
            *step = WS_STEP_WRITE;
            return -EIO;
        }
        pos += w;
        size_t left = (size_t)w;
        while (left > 0 && bi < nbufs) {
            size_t rem = lens[bi] - boff;
            if (left >= rem) {
                left -= rem;
                bi++;
                boff = 0;
            } else {
                boff += left;
                left = 0;
            }
        }
    }
    if (do_sync) {
        int rc = ws_fdatasync(fd);
        if (rc != 0) {
            *step = WS_STEP_SYNC;
            return rc;
        }
    }
    return 0;
}

int ws_fdatasync(int fd)
{
    /* EINTR means the sync did not run, so repeating it is safe; any other error is
     * final (a failed fsync may have dropped dirty pages: never retry and trust it). */
    while (fdatasync(fd) != 0) {
        if (errno != EINTR)
            return -errno;
    }
    return 0;
}

/* Extend the file with written zeros where posix_fallocate is unsupported. Only bytes past
 * the current end are written: zero-filling inside the file could destroy records. */
static int zero_extend(int fd, int64_t offset, int64_t len)
{
    static const uint8_t zeros[65536];
    struct stat st;
    if (fstat(fd, &st) != 0)
        return -errno;
    int64_t pos = offset > (int64_t)st.st_size ? offset : (int64_t)st.st_size;
    int64_t end = offset + len;
    while (pos < end) {
        size_t n = end - pos < (int64_t)sizeof zeros ? (size_t)(end - pos) : sizeof zeros;
        ssize_t w = pwrite(fd, zeros, n, (off_t)pos);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (w == 0)
            return -EIO;
        pos += w;
    }
    return 0;
}

int ws_fallocate(int fd, int64_t offset, int64_t len)
{
    if (offset < 0 || len < 0 || offset > INT64_MAX - len)
        return -EINVAL;
    if (len == 0)
        return 0;
    int rc;
    do
        rc = posix_fallocate(fd, (off_t)offset, (off_t)len);
    while (rc == EINTR);
    if (rc == 0)
        return 0;
    if (rc != EOPNOTSUPP && rc != EINVAL)
        return -rc;
    return zero_extend(fd, offset, len);
}

/* ---- scanning ---- */

int ws_is_zero(const uint8_t *buf, size_t len)
{
    /* Comparing the buffer with itself shifted by one byte uses libc's vectorised memcmp. */
    if (len == 0)
        return 1;
    return buf[0] == 0 && memcmp(buf, buf + 1, len - 1) == 0;
}

static int reserved_ok(const uint8_t *h)
{
    return (h[9] & ~WS_FLAG_BATCH_END) == 0 && ld16(h + 10) == 0 && ld32(h + 12) == 0;
}

int ws_scan(const uint8_t *buf, size_t len, size_t start, uint64_t expected_index,
            uint64_t min_epoch, uint32_t max_body, uint64_t *offsets_out, size_t offsets_cap,
            ws_scan_result *res)
{
    if (res == NULL || (start & 7) != 0 || start > len || expected_index == 0 ||
        max_body > WS_MAX_RECORD_BODY_BYTES)
        return -EINVAL;

    size_t off = start;
    uint64_t index = expected_index;
    uint64_t last_epoch = min_epoch;
    uint64_t count = 0;
    int reason;
    res->batch_end_offset = 0;
    res->batch_end_index = expected_index - 1;

    for (;;) {
        const uint8_t *h = buf + off;
        size_t avail = len - off;
        if (avail < WS_RECORD_HEADER_BYTES) {
            reason = ws_is_zero(h, avail) ? WS_SCAN_END_ZERO : WS_SCAN_TRUNCATED;
            break;
        }
        /* A zero length+crc word almost always means the end; confirm on the whole rest. */
        if (ld64(h) == 0 && ws_is_zero(h, avail)) {
            reason = WS_SCAN_END_ZERO;
            break;
        }
        uint32_t body_len = ld32(h);
        if (body_len > max_body) {
            reason = WS_SCAN_BAD_LENGTH;
            break;
        }
        size_t rs = record_size(body_len);
        if (rs > avail) {
            reason = WS_SCAN_TRUNCATED;
            break;
        }
        if (ld32(h + 4) != record_crc(h, body_len)) {
            reason = WS_SCAN_BAD_CRC;
            break;
        }
        if (!ws_is_zero(h + WS_RECORD_HEADER_BYTES + body_len,
                        rs - WS_RECORD_HEADER_BYTES - body_len)) {
            reason = WS_SCAN_BAD_PADDING;
            break;
        }
        if (h[8] == 0 || h[8] > WS_KIND_MAX) {
            reason = WS_SCAN_BAD_KIND;
            break;
        }
        if (!reserved_ok(h)) {
            reason = WS_SCAN_BAD_RESERVED;
            break;
        }
        uint64_t epoch = ld64(h + 16);
        if (epoch == 0 || epoch < last_epoch) {
            reason = WS_SCAN_BAD_EPOCH;
            break;
        }
        if (ld64(h + 24) != index) {
            reason = WS_SCAN_BAD_INDEX;
            break;
        }
        /* FULL only when another valid record exists, so a scan that fills the array
         * exactly at the end of the data still reports END_ZERO. */
        if (offsets_out != NULL) {
            if (count == offsets_cap) {
                reason = WS_SCAN_FULL;
                break;
            }
            offsets_out[count] = off;
        }
        count++;
        last_epoch = epoch;
        off += rs;
        if (h[9] & WS_FLAG_BATCH_END) {
            res->batch_end_offset = off;
            res->batch_end_index = index;
        }
        index++;
    }
    res->count = count;
    res->end_offset = off;
    res->next_index = index;
    res->last_epoch = last_epoch;
    res->reason = reason;
    return 0;
}

const char *ws_scan_reason_name(int reason)
{
    static const char *const names[] = {
        "END_ZERO", "BAD_LENGTH", "BAD_CRC", "BAD_KIND", "BAD_INDEX",
        "BAD_EPOCH", "BAD_PADDING", "TRUNCATED", "FULL", "BAD_RESERVED",
    };
    if (reason < 0 || (size_t)reason >= sizeof names / sizeof names[0])
        return "UNKNOWN";
    return names[reason];
}

int ws_find_valid_record(const uint8_t *buf, size_t len, size_t start, uint32_t max_body,
                         size_t *found)
{
    if (found == NULL || max_body > WS_MAX_RECORD_BODY_BYTES)
        return -EINVAL;
    if (start >= len)
        return 0;
    /* Cheap structural checks first: garbage almost never passes them, which keeps the
     * CRC (over up to max_body bytes) off most of the candidate offsets. */
    for (size_t off = (start + 8) & ~(size_t)7;
         off <= len && len - off >= WS_RECORD_HEADER_BYTES; off += 8) {
        const uint8_t *h = buf + off;
        if (h[8] == 0 || h[8] > WS_KIND_MAX || !reserved_ok(h))
            continue;
        if (ld64(h + 16) == 0 || ld64(h + 24) == 0)
            continue;
        uint32_t body_len = ld32(h);
        if (body_len > max_body || record_size(body_len) > len - off)
            continue;
        if (ld32(h + 4) != record_crc(h, body_len))
            continue;
        if (!ws_is_zero(h + WS_RECORD_HEADER_BYTES + body_len,
                        record_size(body_len) - WS_RECORD_HEADER_BYTES - body_len))
            continue;
        *found = off;
        return 1;
    }
    return 0;
}

/* ---- u64 -> u64 hash map ----
 * Open addressing, linear probing, power-of-two capacity, grows past 70% load, deletion
 * by backward shift (no tombstones, so lookups never slow down after churn). Key 0 marks
 * an empty slot; the key 0 itself lives in a side flag. Keys are mixed (murmur3 fmix64)
 * because callers also use sequential integers, which would cluster unmixed. */

typedef struct {
    uint64_t key;
    uint64_t value;
} ws_slot;

struct ws_map {
    ws_slot *slots;
    size_t cap; /* power of two */
    size_t len; /* entries in slots, not counting key 0 */
    size_t grow_at;
    int has_zero;
    uint64_t zero_value;
};

#define WS_MAP_MIN_CAP 16

static inline uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static size_t grow_threshold(size_t cap) { return cap / 10 * 7 + (cap % 10) * 7 / 10; }

/* 1 and the slot if key is present, else 0 and the empty slot where it would go. */
static int map_find(const ws_slot *slots, size_t cap, uint64_t key, size_t *pos)
{
    size_t mask = cap - 1;
    size_t i = (size_t)mix64(key) & mask;
    for (;;) {
        if (slots[i].key == 0) {
            *pos = i;
            return 0;
        }
        if (slots[i].key == key) {
            *pos = i;
            return 1;
        }
        i = (i + 1) & mask;
    }
}

static int map_resize(ws_map *m, size_t cap)
{
    ws_slot *slots = calloc(cap, sizeof *slots);
    if (slots == NULL)
        return -ENOMEM;
    for (size_t i = 0; i < m->cap; i++) {
        if (m->slots[i].key != 0) {
            size_t pos;
            map_find(slots, cap, m->slots[i].key, &pos);
            slots[pos] = m->slots[i];
        }
    }
    free(m->slots);
    m->slots = slots;
    m->cap = cap;
    m->grow_at = grow_threshold(cap);
    return 0;
}

ws_map *ws_map_new(size_t capacity_hint)
{
    size_t cap = WS_MAP_MIN_CAP;
    while (grow_threshold(cap) < capacity_hint) {
        if (cap > SIZE_MAX / 2 / sizeof(ws_slot))
            return NULL;
        cap <<= 1;
    }
    ws_map *m = calloc(1, sizeof *m);
    if (m == NULL)
        return NULL;
    /* calloc: large zeroed allocations come from fresh mmap pages, so this is lazy. */
    m->slots = calloc(cap, sizeof *m->slots);
    if (m->slots == NULL) {
        free(m);
        return NULL;
    }
    m->cap = cap;
    m->grow_at = grow_threshold(cap);
    return m;
}

void ws_map_free(ws_map *m)
{
    if (m != NULL) {
        free(m->slots);
        free(m);
    }
}

int ws_map_put(ws_map *m, uint64_t key, uint64_t value)
{
    if (key == 0) {
        m->has_zero = 1;
        m->zero_value = value;
        return 0;
    }
    size_t pos;
    if (map_find(m->slots, m->cap, key, &pos)) {
        m->slots[pos].value = value;
        return 0;
    }
    if (m->len + 1 > m->grow_at) {
        if (m->cap > SIZE_MAX / 2 / sizeof(ws_slot) || map_resize(m, m->cap * 2) != 0)
            return -ENOMEM;
        map_find(m->slots, m->cap, key, &pos);
    }
    m->slots[pos].key = key;
    m->slots[pos].value = value;
    m->len++;
    return 0;
}

int ws_map_get(const ws_map *m, uint64_t key, uint64_t *value)
{
    if (key == 0) {
        if (m->has_zero)
            *value = m->zero_value;
        return m->has_zero;
    }
    size_t pos;
    if (!map_find(m->slots, m->cap, key, &pos))
        return 0;
    *value = m->slots[pos].value;
    return 1;
}

int ws_map_del(ws_map *m, uint64_t key)
{
    if (key == 0) {
        int had = m->has_zero;
        m->has_zero = 0;
        return had;
    }
    size_t hole;
    if (!map_find(m->slots, m->cap, key, &hole))
        return 0;
    /* Pull later members of the probe run back into the hole when their home slot does
     * not lie strictly between the hole and where they sit (cyclically). */
    size_t mask = m->cap - 1;
    for (size_t j = (hole + 1) & mask; m->slots[j].key != 0; j = (j + 1) & mask) {
        size_t home = (size_t)mix64(m->slots[j].key) & mask;
        if (((j - home) & mask) >= ((j - hole) & mask)) {
            m->slots[hole] = m->slots[j];
            hole = j;
        }
    }
    m->slots[hole].key = 0;
    m->slots[hole].value = 0;
    m->len--;
    return 1;
}

int ws_map_put_many(ws_map *m, const uint64_t *keys, const uint64_t *values, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        int rc = ws_map_put(m, keys[i], values[i]);
        if (rc != 0)
            return rc;
    }
    return 0;
}

void ws_map_get_many(const ws_map *m, const uint64_t *keys, size_t n, uint64_t *values,
                     uint8_t *found)
{
    for (size_t i = 0; i < n; i++) {
        values[i] = 0;
        found[i] = (uint8_t)ws_map_get(m, keys[i], &values[i]);
    }
}

size_t ws_map_len(const ws_map *m) { return m->len + (size_t)m->has_zero; }

size_t ws_map_bytes(const ws_map *m) { return sizeof *m + m->cap * sizeof(ws_slot); }
