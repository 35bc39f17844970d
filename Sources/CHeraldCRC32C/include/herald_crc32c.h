#ifndef HERALD_CRC32C_H
#define HERALD_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/// CRC-32C (Castagnoli) of `length` bytes, continuing from `crc` (start with 0).
/// Uses the SSE 4.2 instruction when the CPU has it, a table otherwise.
uint32_t herald_crc32c(uint32_t crc, const void *bytes, size_t length);

#endif
