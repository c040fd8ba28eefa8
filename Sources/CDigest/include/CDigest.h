// SHA-256 with the x86 SHA extensions (SHA-NI), for Images' SHA256 when the CPU has them.
#pragma once
#include <stddef.h>
#include <stdint.h>

// SHA-256's 64 round constants (FIPS 180-4, 4.2.2), shared with the portable Swift rounds.
const uint32_t *swiftlet_sha256_round_constants(void);

// Whether this CPU has the SHA extensions (and the SSSE3/SSE4.1 the routine also uses).
int swiftlet_sha256_hardware_available(void);

// Runs the SHA-256 compression function over `blocks` consecutive 64-byte blocks at `data`,
// updating `state` (a, b, ..., h). Call only when swiftlet_sha256_hardware_available().
void swiftlet_sha256_hardware_blocks(uint32_t state[8], const uint8_t *data, size_t blocks);
