package tfeventstest

import "testing"

// The reader's checksum against published values: CRC-32C of "123456789"
// is 0xe3069283 (RFC 3720, B.4), and the mask of 0 is TFRecord's offset.
func TestMaskedCRC32C(t *testing.T) {
	unmask := func(m uint32) uint32 { r := m - 0xa282ead8; return r>>17 | r<<15 }
	if got := unmask(maskedCRC32C([]byte("123456789"))); got != 0xe3069283 {
		t.Errorf("CRC-32C(123456789) = %#x, want 0xe3069283", got)
	}
	if got := maskedCRC32C(nil); got != 0xa282ead8 {
		t.Errorf("masked CRC of nothing = %#x, want 0xa282ead8", got)
	}
}
