/*
 * walstore_native.h: the C hot path of walstore's write-ahead log.
 *
 * Every function returns 0 (or a count / boolean as documented) on success and -errno on
 * failure. Nothing here prints, exits, allocates on the caller's behalf (except ws_map) or
 * keeps global mutable state beyond the CRC tables built once at load time.
 *
 * WAL record format (all integers little-endian; every record starts 8-aligned):
 *
 *     offset size field
 *     0      4    body_len   u32, <= WS_MAX_RECORD_BODY_BYTES (16 MiB), checked before use
 *     4      4    crc        CRC32C of header bytes [0,4) then [8, 32+body_len): the header
 *                            without its crc field, then the body. Padding is not covered.
 *     8      1    kind       1 EVENT, 2 EPOCH_START, 3 NOOP, 4 TRACKING; 0 is invalid, so
 *                            a zeroed header is never a record
 *     9      1    flags      bit 0 BATCH_END (last record of an atomic batch); others 0
 *     10     2    reserved   0
 *     12     4    reserved   0
 *     16     8    epoch      u64 >= 1, non-decreasing along the log
 *     24     8    index      u64 >= 1, consecutive along the log
 *     32     n    body
 *     32+n   pad  zeros up to the next multiple of 8
 *
 *     record_size(n) = 32 + ((n + 7) & ~7)
 *
 * The 8-byte alignment puts each length word inside one sector, so a torn write can zero
 * or cut a record but cannot leave a half-written length pointing into the next one.
 *
 * The block between the CDEF markers is fed verbatim to cffi (build_native.py), so it
 * must stay free of preprocessor lines other than integer #defines.
 */
#ifndef WALSTORE_NATIVE_H
#define WALSTORE_NATIVE_H

#include <stddef.h>
#include <stdint.h>

/* CDEF-BEGIN */
#define WS_RECORD_HEADER_BYTES 32
#define WS_MAX_RECORD_BODY_BYTES 16777216

#define WS_KIND_EVENT 1
#define WS_KIND_EPOCH_START 2
#define WS_KIND_NOOP 3
#define WS_KIND_TRACKING 4
#define WS_KIND_MAX 4

#define WS_FLAG_BATCH_END 1

/* which step of ws_pwritev_sync failed */
#define WS_STEP_NONE 0
#define WS_STEP_WRITE 1
#define WS_STEP_SYNC 2

/* why ws_scan stopped */
#define WS_SCAN_END_ZERO 0     /* the rest of the buffer from end_offset is all zero */
#define WS_SCAN_BAD_LENGTH 1   /* body_len above max_body */
#define WS_SCAN_BAD_CRC 2
#define WS_SCAN_BAD_KIND 3     /* valid CRC, kind 0 or unknown */
#define WS_SCAN_BAD_INDEX 4    /* valid CRC, index is not the expected one */
#define WS_SCAN_BAD_EPOCH 5    /* valid CRC, epoch 0 or lower than the previous one */
#define WS_SCAN_BAD_PADDING 6  /* valid CRC, non-zero padding */
#define WS_SCAN_TRUNCATED 7    /* the record (or a non-zero partial header) runs past len */
#define WS_SCAN_FULL 8         /* offsets_cap reached; resume at end_offset */
#define WS_SCAN_BAD_RESERVED 9 /* valid CRC, unknown flag bits or non-zero reserved bytes */

typedef struct {
    uint64_t count;            /* valid records found by this call */
    uint64_t end_offset;       /* just past the last valid record (start if none) */
    uint64_t next_index;       /* expected_index + count */
    uint64_t last_epoch;       /* epoch of the last valid record (min_epoch if none) */
    uint64_t batch_end_offset; /* just past the last valid BATCH_END record, 0 if none */
    uint64_t batch_end_index;  /* its index, expected_index - 1 if none */
    int32_t reason;            /* WS_SCAN_* */
} ws_scan_result;

/* CRC32C with the `crc32c` PyPI package's convention: pass the previous result to chain. */
uint32_t ws_crc32c(uint32_t crc, const uint8_t *buf, size_t len);
uint32_t ws_crc32c_sw(uint32_t crc, const uint8_t *buf, size_t len);
int ws_crc32c_hw_available(void);

/* Encode n records with indexes first_index.. into out. bodies holds the n bodies back to
 * back. *out_len is always set to the bytes needed; -ENOBUFS if out_cap is smaller,
 * -EMSGSIZE for a body over the limit, -EINVAL for a bad kind/flag/epoch/index. */
int ws_encode_batch(const uint8_t *bodies, const uint32_t *body_lens, const uint8_t *kinds,
                    const uint8_t *flags, size_t n, uint64_t epoch, uint64_t first_index,
                    uint8_t *out, size_t out_cap, size_t *out_len);

/* Write every buffer at offset (pwritev, looping on short writes and EINTR), then one
 * fdatasync if do_sync. *failed_step (may be NULL) tells which call returned -errno. */
int ws_pwritev_sync(int fd, int64_t offset, const uint8_t *const *bufs, const size_t *lens,
                    int nbufs, int do_sync, int *failed_step);
int ws_fdatasync(int fd);
int ws_fallocate(int fd, int64_t offset, int64_t len);

/* Validate records from start (8-aligned); see WS_SCAN_* for where it stops. offsets_out
 * may be NULL (verify only: never stops FULL). Returns 0, or -EINVAL for bad arguments. */
int ws_scan(const uint8_t *buf, size_t len, size_t start, uint64_t expected_index,
            uint64_t min_epoch, uint32_t max_body, uint64_t *offsets_out, size_t offsets_cap,
            ws_scan_result *res);
const char *ws_scan_reason_name(int reason);

/* First 8-aligned offset > start holding a structurally valid record with a matching CRC
 * (index and epoch continuity not checked): 1 and *found set, or 0 if none. */
int ws_find_valid_record(const uint8_t *buf, size_t len, size_t start, uint32_t max_body,
                         size_t *found);
int ws_is_zero(const uint8_t *buf, size_t len);

/* u64 -> u64 open-addressing hash map (not thread-safe; one owner at a time). */
typedef struct ws_map ws_map;
ws_map *ws_map_new(size_t capacity_hint);
void ws_map_free(ws_map *m);
int ws_map_put(ws_map *m, uint64_t key, uint64_t value);
int ws_map_get(const ws_map *m, uint64_t key, uint64_t *value);
int ws_map_del(ws_map *m, uint64_t key);
/* Many at once: one boundary crossing instead of n (the crossing costs more than the op).
 * put_many stops at the first -ENOMEM with the earlier pairs inserted; get_many sets
 * found[i] to 1 and values[i] for each present key, found[i] = 0 otherwise. */
int ws_map_put_many(ws_map *m, const uint64_t *keys, const uint64_t *values, size_t n);
void ws_map_get_many(const ws_map *m, const uint64_t *keys, size_t n, uint64_t *values,
                     uint8_t *found);
size_t ws_map_len(const ws_map *m);
size_t ws_map_bytes(const ws_map *m);
/* CDEF-END */

#endif /* WALSTORE_NATIVE_H */
