package ranks

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"slices"
	"sync/atomic"
	"time"
)

// Options tune Join.
type Options struct {
	// Token is what every rank must agree on (the spec's stage key and the
	// program's build, say); a rank with another is refused, and the
	// whole group fails naming both.
	Token string
	// JoinTimeout bounds the rendezvous (default 5 minutes): rank 0 waits
	// that long for the others, they retry reaching it that long.
	JoinTimeout time.Duration
	// OpTimeout bounds how long a collective waits for a rank that is
	// alive but silent (default 30 minutes); a rank that dies is noticed
	// at once, through its closed connection.
	OpTimeout time.Duration
	// Log, when set, hears every 30 seconds of the rendezvous who is
	// still awaited, so that a rank waiting for a peer that never comes
	// (a misspelt MASTER_ADDR, a launch left in a shell) says so.
	Log *slog.Logger
}

// waitNoteEvery is how often a rendezvous still waiting says so.
var waitNoteEvery = 30 * time.Second

func (o *Options) defaults() {
	if o.JoinTimeout <= 0 {
		o.JoinTimeout = 5 * time.Minute
	}
	if o.OpTimeout <= 0 {
		o.OpTimeout = 30 * time.Minute
	}
}

// Group is a run's ranks connected to rank 0 over TCP. It implements
// trainer.Group: a collective gathers every rank's part at rank 0, which
// combines them in rank order and sends every rank the same result.
// Collectives are called from one goroutine.
type Group struct {
	rank, size int
	localRank  int
	peers      []*peer // at rank 0, peers[r] is rank r (nil for 0); elsewhere peers[0] is rank 0
	opt        Options
	failed     error // the first failure: every later collective returns it
}

type peer struct {
	rank int
	conn net.Conn
	r    *bufio.Reader
	w    *bufio.Writer
}

// Frame kinds.
const (
	opHello byte = iota + 1
	opWelcome
	opError
	opSum
	opBroadcast
)

var opNames = map[byte]string{opHello: "hello", opWelcome: "welcome", opError: "error", opSum: "sum", opBroadcast: "broadcast"}

type hello struct {
	Rank  int    `json:"rank"`
	Size  int    `json:"size"`
	Token string `json:"token"`
}

// keepAlive notices a machine that vanished (no FIN) in about half a minute.
var keepAlive = net.KeepAliveConfig{Enable: true, Idle: 10 * time.Second, Interval: 5 * time.Second, Count: 4}

// Join connects rank r to the others: rank 0 listens on r.Addr's port and
// waits for every other rank; the others connect to it, retrying until
// the join timeout. A run of one rank needs no connection.
func Join(ctx context.Context, r Rank, opt Options) (*Group, error) {
	opt.defaults()
	g := &Group{rank: r.Rank, size: r.Size, localRank: r.LocalRank, opt: opt}
	if r.Size <= 1 {
		return g, nil
	}
	host, port, err := net.SplitHostPort(r.Addr)
	if err != nil {
		return nil, fmt.Errorf("rendezvous address %q: %w", r.Addr, err)
	}
	listen := "" // every interface: the other ranks may be other machines
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		listen = host // ranks of this machine alone (--gpus): nothing outside may join
	}
	ctx, cancel := context.WithTimeout(ctx, opt.JoinTimeout)
	defer cancel()
	if r.Rank == 0 {
		err = g.accept(ctx, net.JoinHostPort(listen, port))
	} else {
		err = g.connect(ctx, r.Addr)
	}
	if err != nil {
		g.Close()
		return nil, err
	}
	return g, nil
}

func (g *Group) accept(ctx context.Context, addr string) error {
	lc := net.ListenConfig{KeepAliveConfig: keepAlive}
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("rank 0: listening for the other ranks on %s: %w", addr, err)
	}
	defer ln.Close()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	g.peers = make([]*peer, g.size)
	var joinedNow atomic.Int32 // for the notes, read beside the loop
	joinedNow.Store(1)
	defer g.noteWhile(ctx, func() string {
		return fmt.Sprintf("rank 0: %d of %d ranks joined; waiting for the others at port %s", joinedNow.Load(), g.size, addr)
	})()
	for joined := 1; joined < g.size; {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return g.abort(fmt.Errorf("rank 0: ranks %v did not join within %v: are they running, and do they have this MASTER_ADDR and MASTER_PORT?", g.missing(), g.opt.JoinTimeout))
			}
			return g.abort(fmt.Errorf("rank 0: accepting a rank: %w", err))
		}
		p := newPeer(-1, conn)
		// A rank says hello as soon as it connects; a stray connection
		// must not hold up the others for long.
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		op, body, err := p.read()
		if err != nil || op != opHello {
			conn.Close() // not one of ours, or gone already
			continue
		}
		var h hello
		if err := json.Unmarshal(body, &h); err != nil {
			conn.Close()
			continue
		}
		p.rank = h.Rank
		var why string
		switch {
		case h.Size != g.size:
			why = fmt.Sprintf("rank %d was started for %d ranks, rank 0 for %d", h.Rank, h.Size, g.size)
		case h.Rank < 1 || h.Rank >= g.size:
			why = fmt.Sprintf("a rank %d joined a run of %d ranks", h.Rank, g.size)
		case g.peers[h.Rank] != nil:
			why = fmt.Sprintf("two processes say they are rank %d", h.Rank)
		case h.Token != g.opt.Token:
			why = fmt.Sprintf("rank %d runs something else than rank 0 (%s, rank 0 %s): the same binary and spec must run on every rank", h.Rank, h.Token, g.opt.Token)
		}
		if why != "" {
			p.write(opError, []byte(why))
			conn.Close()
			return g.abort(errors.New(why))
		}
		conn.SetDeadline(time.Time{})
		g.peers[h.Rank] = p
		joined++
		joinedNow.Store(int32(joined))
	}
	for _, p := range g.peers[1:] {
		if err := p.write(opWelcome, nil); err != nil {
			return g.abort(fmt.Errorf("rank %d went away during the rendezvous: %w", p.rank, err))
		}
	}
	return nil
}

// noteWhile logs note() every waitNoteEvery until the returned stop is
// called or ctx ends; without a Log it does nothing.
func (g *Group) noteWhile(ctx context.Context, note func() string) (stop func()) {
	if g.opt.Log == nil {
		return func() {}
	}
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(waitNoteEvery)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				g.opt.Log.Info(note(), "gives_up_after", g.opt.JoinTimeout)
			case <-done:
				return
			case <-ctx.Done():
				return
			}
		}
	}()
	return func() { close(done) }
}

// missing lists the ranks that have not joined.
func (g *Group) missing() []int {
	var out []int
	for r := 1; r < g.size; r++ {
		if g.peers[r] == nil {
			out = append(out, r)
		}
	}
	return out
}

func (g *Group) connect(ctx context.Context, addr string) error {
	d := net.Dialer{KeepAliveConfig: keepAlive, Timeout: 5 * time.Second}
	var conn net.Conn
	var last atomic.Pointer[string] // the last dial's error, or that it connected: for the notes
	defer g.noteWhile(ctx, func() string {
		note := fmt.Sprintf("rank %d: waiting for rank 0 at %s", g.rank, addr)
		if err := last.Load(); err != nil {
			note += " (" + *err + ")"
		}
		return note
	})()
	for conn == nil {
		c, err := d.DialContext(ctx, "tcp", addr)
		if err == nil {
			conn = c
			connected := "connected; rank 0 waits for the other ranks, or this is not a rank 0 of this program"
			last.Store(&connected)
			break
		}
		msg := err.Error()
		last.Store(&msg)
		select {
		case <-ctx.Done():
			return fmt.Errorf("rank %d: rank 0 at %s could not be reached within %v (%v): is it running, and is MASTER_ADDR right?", g.rank, addr, g.opt.JoinTimeout, err)
		case <-time.After(200 * time.Millisecond):
		}
	}
	p := newPeer(0, conn)
	g.peers = []*peer{p}
	body, _ := json.Marshal(hello{Rank: g.rank, Size: g.size, Token: g.opt.Token})
	deadline, _ := ctx.Deadline()
	conn.SetDeadline(deadline)
	if err := p.write(opHello, body); err != nil {
		return fmt.Errorf("rank %d: introducing itself to rank 0 at %s: %w", g.rank, addr, err)
	}
	op, msg, err := p.read()
	switch {
	case err != nil && errors.Is(err, io.EOF):
		return fmt.Errorf("rank %d: rank 0 closed the rendezvous: another rank was refused, or rank 0 stopped", g.rank)
	case err != nil:
		return fmt.Errorf("rank %d: waiting for rank 0 at %s to gather every rank: %w", g.rank, addr, err)
	case op == opError:
		return fmt.Errorf("rank %d: rank 0 refused the group: %s", g.rank, msg)
	case op != opWelcome:
		return fmt.Errorf("rank %d: rank 0 answered %s to its hello", g.rank, opNames[op])
	}
	conn.SetDeadline(time.Time{})
	return nil
}

// Rank and Size place this process in the group; LocalRank among the
// ranks of its machine (the GPU it takes).
func (g *Group) Rank() int      { return g.rank }
func (g *Group) Size() int      { return g.size }
func (g *Group) LocalRank() int { return g.localRank }

// AllReduceSum replaces x with its sum over the ranks: rank 0 adds the
// parts in rank order, so that every rank gets the same bits.
func (g *Group) AllReduceSum(x []float64) error {
	if g.size <= 1 {
		return nil
	}
	part := make([]byte, 8*len(x))
	for i, v := range x {
		binary.LittleEndian.PutUint64(part[8*i:], math.Float64bits(v))
	}
	sum, err := g.gather(opSum, part, func(parts [][]byte) ([]byte, error) {
		acc := slices.Clone(x)
		for r, p := range parts[1:] {
			if len(p) != len(part) {
				return nil, fmt.Errorf("rank %d summed %d values, rank 0 %d: the ranks are at different points of the run", r+1, len(p)/8, len(x))
			}
			for i := range acc {
				acc[i] += math.Float64frombits(binary.LittleEndian.Uint64(p[8*i:]))
			}
		}
		out := make([]byte, len(part))
		for i, v := range acc {
			binary.LittleEndian.PutUint64(out[8*i:], math.Float64bits(v))
		}
		return out, nil
	})
	if err != nil {
		return err
	}
	if len(sum) != len(part) {
		return g.fail(fmt.Errorf("rank 0 sent %d sums for %d values", len(sum)/8, len(x)))
	}
	for i := range x {
		x[i] = math.Float64frombits(binary.LittleEndian.Uint64(sum[8*i:]))
	}
	return nil
}

// Broadcast returns root's data on every rank.
func (g *Group) Broadcast(root int, data []byte) ([]byte, error) {
	if root < 0 || root >= g.size {
		return nil, fmt.Errorf("broadcast from rank %d in a group of %d", root, g.size)
	}
	if g.size <= 1 {
		return slices.Clone(data), nil
	}
	mine := []byte(nil)
	if g.rank == root {
		mine = data
	}
	return g.gather(opBroadcast, mine, func(parts [][]byte) ([]byte, error) { return parts[root], nil })
}

// gather sends this rank's part to rank 0 and returns what rank 0 makes
// of all parts (combine, which runs at rank 0 on the parts by rank).
func (g *Group) gather(op byte, part []byte, combine func([][]byte) ([]byte, error)) ([]byte, error) {
	if g.failed != nil {
		return nil, g.failed
	}
	if g.rank != 0 {
		p := g.peers[0]
		if err := p.write(op, part); err != nil {
			return nil, g.fail(fmt.Errorf("rank 0 went away: %w", err))
		}
		p.conn.SetReadDeadline(time.Now().Add(g.opt.OpTimeout + time.Minute))
		got, body, err := p.read()
		switch {
		case err != nil:
			return nil, g.fail(peerErr(0, err, g.opt.OpTimeout))
		case got == opError:
			return nil, g.fail(fmt.Errorf("the group failed: %s", body))
		case got != op:
			return nil, g.fail(fmt.Errorf("rank 0 answered a %s with a %s: the ranks are at different points of the run", opNames[op], opNames[got]))
		}
		return body, nil
	}
	parts := make([][]byte, g.size)
	parts[0] = part
	for _, p := range g.peers[1:] {
		p.conn.SetReadDeadline(time.Now().Add(g.opt.OpTimeout))
		got, body, err := p.read()
		switch {
		case err != nil:
			return nil, g.abort(peerErr(p.rank, err, g.opt.OpTimeout))
		case got == opError:
			return nil, g.abort(fmt.Errorf("rank %d failed: %s", p.rank, body))
		case got != op:
			return nil, g.abort(fmt.Errorf("rank %d sent a %s where rank 0 expected a %s: the ranks are at different points of the run", p.rank, opNames[got], opNames[op]))
		}
		parts[p.rank] = body
	}
	out, err := combine(parts)
	if err != nil {
		return nil, g.abort(err)
	}
	for _, p := range g.peers[1:] {
		if err := p.write(op, out); err != nil {
			return nil, g.abort(fmt.Errorf("rank %d went away: %w", p.rank, err))
		}
	}
	return out, nil
}

func peerErr(rank int, err error, timeout time.Duration) error {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return fmt.Errorf("rank %d said nothing for %v: it hangs or is far behind", rank, timeout)
	}
	return fmt.Errorf("rank %d went away (%v): it stopped or its machine did", rank, err)
}

// fail records the group's first failure.
func (g *Group) fail(err error) error {
	if g.failed == nil {
		g.failed = err
	}
	return g.failed
}

// abort, at rank 0, tells every rank the group failed and closes it, so
// that no rank waits on it.
func (g *Group) abort(err error) error {
	err = g.fail(err)
	for _, p := range g.peers {
		if p != nil {
			p.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
			p.write(opError, []byte(err.Error()))
		}
	}
	g.Close()
	return err
}

// Close ends this rank's part in the group; the others notice at their
// next collective.
func (g *Group) Close() error {
	for _, p := range g.peers {
		if p != nil {
			p.conn.Close()
		}
	}
	if g.failed == nil {
		g.failed = errors.New("the group is closed")
	}
	return nil
}

func newPeer(rank int, conn net.Conn) *peer {
	return &peer{rank: rank, conn: conn, r: bufio.NewReader(conn), w: bufio.NewWriter(conn)}
}

// A frame is a kind byte, a length (uint32, little-endian) and the body.
const maxFrame = 1 << 30

func (p *peer) write(op byte, body []byte) error {
	var h [5]byte
	h[0] = op
	binary.LittleEndian.PutUint32(h[1:], uint32(len(body)))
	if _, err := p.w.Write(h[:]); err != nil {
		return err
	}
	if _, err := p.w.Write(body); err != nil {
		return err
	}
	return p.w.Flush()
}

func (p *peer) read() (byte, []byte, error) {
	var h [5]byte
	if _, err := io.ReadFull(p.r, h[:]); err != nil {
		return 0, nil, err
	}
	n := binary.LittleEndian.Uint32(h[1:])
	if n > maxFrame || opNames[h[0]] == "" {
		return 0, nil, fmt.Errorf("a frame of kind %d and %d bytes: not this program's protocol", h[0], n)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(p.r, body); err != nil {
		return 0, nil, err
	}
	return h[0], body, nil
}
