package bolt

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"reflect"
	"runtime"
	"testing"
	"time"

	"go.etcd.io/bbolt"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// TestApplyMemtableMatchesModel: applyMemtable (one cursor, puts and deletes between its seeks,
// the entries' encodings stored as they are, scratch keys) leaves the file equal to a model,
// with a consistent expiry index, over many checkpoints of random puts and deletes of new and
// existing ids, with bodies from none to 70 KiB, encodings that share one buffer as a group's
// frame does, and a collection between the transaction and the check. (Written by an audit of
// this session's changes, in its own clone; adapted to the entries.)
func TestApplyMemtableMatchesModel(t *testing.T) {
	dir := t.TempDir()
	db, err := bbolt.Open(filepath.Join(dir, "f.db"), 0o600, &bbolt.Options{InitialMmapSize: 1 << 16})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.Update(func(tx *bbolt.Tx) error {
		for _, b := range [][]byte{bucketRecords, bucketExpiry, bucketFences, bucketMeta} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	model := map[string]keys.Record{}
	base := time.Unix(1_900_000_000, 0).UTC()
	universe := 6000
	for round := 0; round < 40; round++ {
		m := newMemtable()
		n := 50 + rng.IntN(1500)
		var frame []byte // the encodings share it, as they share their group's frame
		for range n {
			id := string(keys.StorageID("t", fmt.Sprintf("k%05d", rng.IntN(universe))))
			if rng.IntN(4) == 0 {
				m.recs[id] = entry{}
				continue
			}
			size := rng.IntN(300)
			if rng.IntN(200) == 0 {
				size = 70 << 10 // larger than a chunk
			}
			body := make([]byte, size)
			for i := range body {
				body[i] = byte(rng.Uint32())
			}
			rec := keys.Record{Key: id, State: keys.StateCompleted, Fingerprint: "fp",
				Lease:     keys.Lease{Token: "tok", Fence: uint64(round)},
				Response:  &keys.Response{Status: 200 + rng.IntN(5), Body: body},
				CreatedAt: base, CompletedAt: base, ExpiresAt: base.Add(time.Duration(rng.IntN(5)) * time.Hour), TTL: time.Hour}
			start := len(frame)
			frame = keys.AppendRecord(frame, &rec)
			r := keys.CloneRecord(&rec)
			m.recs[id] = entry{&r, frame[start:len(frame):len(frame)]}
		}
		if err := db.Update(func(tx *bbolt.Tx) error { return applyMemtable(tx, m, uint64(round+1)) }); err != nil {
			t.Fatal(err)
		}
		for id, e := range m.recs {
			if e.rec == nil {
				delete(model, id)
			} else {
				model[id] = *e.rec
			}
		}
		runtime.GC()
		// Scribble over garbage so that a value still referenced from freed memory would show.
		for range 50 {
			junk := make([]byte, 64<<10)
			for i := range junk {
				junk[i] = 0xAA
			}
			_ = junk
		}
		err := db.View(func(tx *bbolt.Tx) error {
			var errs []error
			for err := range tx.Check() {
				errs = append(errs, err)
			}
			if err := checkIndex(tx); err != nil {
				errs = append(errs, err)
			}
			got := 0
			err := tx.Bucket(bucketRecords).ForEach(func(k, v []byte) error {
				got++
				want, ok := model[string(k)]
				if !ok {
					return fmt.Errorf("record %q in the file, not in the model", k)
				}
				rec, err := keys.DecodeRecord(v)
				if err != nil {
					return err
				}
				if !reflect.DeepEqual(rec, want) || !bytes.Equal(rec.Response.Body, want.Response.Body) {
					return fmt.Errorf("record %q differs", k)
				}
				return nil
			})
			if err != nil {
				errs = append(errs, err)
			}
			if got != len(model) {
				errs = append(errs, fmt.Errorf("file has %d records, model %d", got, len(model)))
			}
			return errors.Join(errs...)
		})
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
	}
}
