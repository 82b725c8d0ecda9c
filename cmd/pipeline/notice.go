package main

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
)

// notice writes one of the command's own messages to stderr: the line as
// it is, or, with --log-format json, a record of the command's logger
// (its level and attributes, a rank's say) whose msg is the line less its
// "pipeline: ", so that a run's JSON log holds nothing but JSON, as a
// collector reading a cron job's log needs. Both go through logSink, which
// keeps a live progress display intact.
func notice(level slog.Level, line string) {
	line = strings.TrimSuffix(line, "\n")
	if logFormat != "json" {
		fmt.Fprintln(logSink, line)
		return
	}
	log, err := newLogger()
	if err != nil { // a bad --log-level: the message still goes out
		log = slog.New(slog.NewJSONHandler(logSink, nil))
	}
	log.Log(context.Background(), level, strings.TrimPrefix(line, "pipeline: "))
}
