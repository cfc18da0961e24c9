package lease

import (
	"math"
	"strconv"
	"testing"
)

// parseInt agrees with strconv.ParseInt on what it accepts.
func TestParseInt(t *testing.T) {
	for _, s := range []string{"0", "7", "-3", "123456789", "7587881234567890123", "9223372036854775807",
		"9223372036854775808", "-9223372036854775807", "", "-", "1a", " 1", "00012", "99999999999999999999"} {
		got, ok := parseInt([]byte(s))
		want, err := strconv.ParseInt(s, 10, 64)
		if ok != (err == nil) || (ok && got != want) {
			t.Errorf("parseInt(%q) = %d, %v; strconv: %d, %v", s, got, ok, want, err)
		}
	}
	if _, ok := parseInt([]byte(strconv.FormatInt(math.MaxInt64, 10))); !ok {
		t.Error("MaxInt64 refused")
	}
}
