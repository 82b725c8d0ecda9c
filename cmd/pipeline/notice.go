package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
)

// notice writes one of the command's own messages to stderr: the line as
// it is, or, with --log-format json, a log record whose msg is the line
// (less its "pipeline: "), so that a JSON log holds nothing but JSON, as a
// cron job's log read by a collector needs.
func notice(level slog.Level, line string) {
	line = strings.TrimSuffix(line, "\n")
	if logFormat != "json" {
		fmt.Fprintln(os.Stderr, line)
		return
	}
	slog.New(slog.NewJSONHandler(logSink, nil)).Log(context.Background(), level, strings.TrimPrefix(line, "pipeline: "))
}
