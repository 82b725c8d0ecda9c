package trainer

import (
	"context"
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

// BenchmarkTrainTinyDemoShape trains the tiny preset for one epoch over 12
// rows of 1024 tokens with half the tokens trained, about the demo's data:
// it reports the wall time of a whole run.
func BenchmarkTrainTinyDemoShape(b *testing.B) {
	c, _ := Preset("tiny")
	dir := b.TempDir()
	if err := WriteRandomCheckpoint(dir, c, InitOptions{Seed: 1}); err != nil {
		b.Fatal(err)
	}
	m, err := LoadModel(dir)
	if err != nil {
		b.Fatal(err)
	}
	rows := trainRows(c.VocabSize, 12, 1024, 1)
	for _, r := range rows {
		for i := range r.Labels {
			if i%2 == 0 {
				r.Labels[i] = IgnoreIndex
			}
		}
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		opts := TrainOptions{LR: 1e-3, BatchSize: 2, GradAccum: 1, Epochs: 1, Seed: 1, OutDir: b.TempDir()}
		s := openCPU(b, m, SessionConfig{LoRA: LoRAConfig{R: 8, Alpha: 16, Dropout: 0.05, Targets: AllModules}, GradientCheckpointing: true})
		if _, err := Train(context.Background(), s, rows, opts); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(12*1024*b.N)/b.Elapsed().Seconds(), "tokens/s")
}
