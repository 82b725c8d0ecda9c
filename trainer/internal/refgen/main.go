// Command refgen writes the inputs of the Hugging Face parity check (see
// package refcases), or with -preset a random checkpoint of a released
// shape.
//
//	go run ./trainer/internal/refgen -out trainer/testdata/reference
package main

import (
	"flag"
	"fmt"
	"log"

	"gemmaft/trainer"
	"gemmaft/trainer/internal/refcases"
)

func main() {
	out := flag.String("out", "trainer/testdata/reference", "directory to write the cases into")
	preset := flag.String("preset", "", "instead of the cases, write a random checkpoint of this preset into -checkpoint")
	ckpt := flag.String("checkpoint", "", "checkpoint directory for -preset")
	shard := flag.Int64("shard-bytes", 0, "shard size for -preset (0: 5 GB)")
	flag.Parse()
	if *preset != "" {
		c, err := trainer.Preset(*preset)
		if err != nil {
			log.Fatal(err)
		}
		if err := trainer.WriteRandomCheckpoint(*ckpt, c, trainer.InitOptions{Seed: 1, MaxShardBytes: *shard}); err != nil {
			log.Fatal(err)
		}
		m, err := trainer.LoadModel(*ckpt)
		if err != nil {
			log.Fatal(err)
		}
		fmt.Printf("wrote and reloaded %s: %d layers, embed scale %v\n", *preset, len(m.Layers), m.EmbedScale())
		return
	}
	if err := refcases.Write(*out); err != nil {
		log.Fatal(err)
	}
}
