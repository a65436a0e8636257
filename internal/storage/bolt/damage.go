package bolt

import (
	"errors"
	"fmt"
	"os"
	"runtime/debug"
	"sync/atomic"

	"go.etcd.io/bbolt"
)

// ErrDamaged is wrapped by the error of an Open that finds the data file cut short, emptied or
// overwritten, and by the error of a transaction that met a damaged page (or panicked for any
// other reason: bbolt rolls it back); from then on Ping reports the damage, so /readyz says 503,
// while the operations that do not touch the damaged pages go on. bbolt
// trusts its file: on a damaged one it panics, or faults on a page of its mapping past the file's
// end, and either would take the whole process down, answered requests' log lines with it.
var ErrDamaged = errors.New("bolt: the data file is damaged")

// openDB is bbolt.Open for a file that may be damaged: a panic or a memory fault while bbolt
// reads it becomes an error wrapping ErrDamaged, and so does a file shorter than the pages its
// meta page counts (a read past the end would fault later, on some request) or an existing
// file of no bytes (which bbolt would take for a new database: every record silently gone).
func openDB(path string, opts *bbolt.Options) (db *bbolt.DB, err error) {
	if fi, err := os.Stat(path); err == nil && fi.Size() == 0 {
		return nil, fmt.Errorf("%w: the file exists but is empty (remove it to start with no records)", ErrDamaged)
	}
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if v := recover(); v != nil {
			// bbolt.Open panicked before returning its DB: its descriptor and lock stay
			// held until the process exits, which is what a service does next.
			db, err = nil, fmt.Errorf("%w: %v", ErrDamaged, v)
		}
	}()
	db, err = bbolt.Open(path, 0o600, opts)
	if err != nil {
		return nil, err
	}
	var want int64
	if err := db.View(func(tx *bbolt.Tx) error { want = tx.Size(); return nil }); err != nil {
		_ = db.Close()
		return nil, err
	}
	fi, err := os.Stat(path)
	if err != nil {
		_ = db.Close()
		return nil, err
	}
	if fi.Size() < want {
		_ = db.Close()
		return nil, fmt.Errorf("%w: it has %d bytes, and its meta page counts %d (cut short?)", ErrDamaged, fi.Size(), want)
	}
	return db, nil
}

// damage remembers the first damage a transaction found, so that Ping (and /readyz) reports the
// store as not ready from then on.
type damage struct{ err atomic.Pointer[error] }

func (d *damage) set(err error) {
	if d != nil {
		d.err.CompareAndSwap(nil, &err)
	}
}

func (d *damage) get() error {
	if p := d.err.Load(); p != nil {
		return *p
	}
	return nil
}

// view is s.db.View with a panic or a memory fault in it (a damaged page) turned into an error
// wrapping ErrDamaged, recorded for Ping.
func (s *Store) view(fn func(*bbolt.Tx) error) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if v := recover(); v != nil {
			err = fmt.Errorf("%w: a read transaction failed: %v", ErrDamaged, v)
			s.damage.set(err)
		}
	}()
	return s.db.View(fn)
}

// updateSafely is db.Update with a panic or a memory fault in it (a damaged page) turned into an
// error wrapping ErrDamaged, recorded in d. bbolt rolls the transaction back as the panic
// unwinds, so nothing of it is committed, and nobody is told otherwise.
func updateSafely(db *bbolt.DB, d *damage, fn func(*bbolt.Tx) error) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if v := recover(); v != nil {
			err = fmt.Errorf("%w: a write transaction failed: %v", ErrDamaged, v)
			d.set(err)
		}
	}()
	return db.Update(fn)
}
