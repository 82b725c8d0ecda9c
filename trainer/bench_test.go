package trainer

import (
	"testing"
)

// BenchmarkTinyPresetStep measures one forward and backward pass of the
// tiny preset (real 262k vocabulary) over one packed row of 256 tokens, the
// unit of the demo's training on CPU.
func BenchmarkTinyPresetStep(b *testing.B) {
	c, _ := Preset("tiny")
	dir := b.TempDir()
	if err := WriteRandomCheckpoint(dir, c, InitOptions{Seed: 1}); err != nil {
		b.Fatal(err)
	}
	m, err := LoadModel(dir)
	if err != nil {
		b.Fatal(err)
	}
	a, _ := NewAdapter(c, LoRAConfig{R: 8, Alpha: 16, Targets: AllModules}, 1)
	rows := trainRows(c.VocabSize, 1, 256, 1)
	batch, _ := NewBatch(rows)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, _, err := m.LossAndGrad(a, batch, float64(batch.Trained()), 0); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(len(batch.IDs))*float64(b.N)/b.Elapsed().Seconds(), "tokens/s")
}
