package linearizability

import (
	"testing"

	"github.com/anishathalye/porcupine"
)

// The model itself, on small hand-written histories: it must accept what the contract allows and
// reject what it forbids, or the proof proves nothing.

func op(client int, in Input, call, ret int64, out Output) porcupine.Operation {
	return porcupine.Operation{ClientId: client, Input: in, Call: call, Output: out, Return: ret}
}

var (
	acquired = func(fence uint64) Output {
		return Output{Status: 201, Key: "k", State: "in_progress", Fingerprint: "fp", Fence: fence, TokenShown: true}
	}
	completedOut = func(resp string) Output {
		return Output{Status: 200, Key: "k", State: "completed", Fingerprint: "fp", HasResponse: true, Response: resp}
	}
	inProgressOut = func(fence uint64) Output {
		return Output{Status: 200, Key: "k", State: "in_progress", Fingerprint: "fp", Fence: fence}
	}
	problem = func(status int, name string) Output { return Output{Status: status, Problem: name} }
	unknown = Output{Unknown: true}
)

func begin(id int) Input { return Input{Kind: Begin, Key: "k", ID: id, Fingerprint: "fp"} }
func complete(id, lease int, resp string) Input {
	return Input{Kind: Complete, Key: "k", ID: id, Lease: lease, Response: resp}
}

func TestModel(t *testing.T) {
	tests := []struct {
		name    string
		history []porcupine.Operation
		want    bool
	}{
		{"OneWinnerOfTwoConcurrentBegins", []porcupine.Operation{
			op(0, begin(1), 0, 10, acquired(5)),
			op(1, begin(2), 1, 9, problem(409, "in-progress")),
		}, true},
		{"TwoWinnersOfConcurrentBegins", []porcupine.Operation{
			op(0, begin(1), 0, 10, acquired(5)),
			op(1, begin(2), 1, 9, acquired(6)),
		}, false},
		{"InProgressBeforeAnyWinner", []porcupine.Operation{
			op(1, begin(2), 0, 1, problem(409, "in-progress")),
			op(0, begin(1), 2, 3, acquired(5)),
		}, false},
		{"ReplayOfTheStoredResponse", []porcupine.Operation{
			op(0, begin(1), 0, 1, acquired(5)),
			op(0, complete(2, 1, "A"), 2, 3, completedOut("A")),
			op(1, begin(3), 4, 5, completedOut("A")),
		}, true},
		{"ReplayOfAnotherResponse", []porcupine.Operation{
			op(0, begin(1), 0, 1, acquired(5)),
			op(0, complete(2, 1, "A"), 2, 3, completedOut("A")),
			op(1, begin(3), 4, 5, completedOut("B")),
		}, false},
		{"SameCompleteAgain", []porcupine.Operation{
			op(0, begin(1), 0, 1, acquired(5)),
			op(0, complete(2, 1, "A"), 2, 3, completedOut("A")),
			op(0, complete(3, 1, "A"), 4, 5, completedOut("A")),
			op(0, complete(4, 1, "B"), 6, 7, problem(409, "already-completed")),
		}, true},
		{"StaleLeaseCompletes", []porcupine.Operation{
			op(0, begin(1), 0, 1, acquired(5)),
			op(0, Input{Kind: Release, Key: "k", ID: 2, Lease: 1}, 2, 3, Output{Status: 204}),
			op(1, begin(3), 4, 5, acquired(6)),
			op(0, complete(4, 1, "A"), 6, 7, completedOut("A")),
		}, false},
		{"FenceDoesNotGrow", []porcupine.Operation{
			op(0, begin(1), 0, 1, acquired(5)),
			op(0, Input{Kind: Delete, Key: "k", ID: 2}, 2, 3, Output{Status: 204}),
			op(1, begin(3), 4, 5, acquired(5)),
		}, false},
		{"GetShowsAToken", []porcupine.Operation{
			op(0, begin(1), 0, 1, acquired(5)),
			op(1, Input{Kind: Get, Key: "k", ID: 2}, 2, 3, Output{Status: 200, Key: "k", State: "in_progress", Fingerprint: "fp", Fence: 5, TokenShown: true}),
		}, false},
		{"MismatchNeverReplays", []porcupine.Operation{
			op(0, begin(1), 0, 1, acquired(5)),
			op(0, complete(2, 1, "A"), 2, 3, completedOut("A")),
			op(1, Input{Kind: Begin, Key: "k", ID: 3, Fingerprint: "other"}, 4, 5, completedOut("A")),
		}, false},
		{"UnknownBeginMayHaveWon", []porcupine.Operation{
			op(0, begin(1), 0, 100, unknown),
			op(1, begin(2), 10, 11, problem(409, "in-progress")),
			op(1, Input{Kind: Get, Key: "k", ID: 3}, 12, 13, inProgressOut(7)),
		}, true},
		{"UnknownBeginMayHaveLost", []porcupine.Operation{
			op(0, begin(1), 0, 100, unknown),
			op(1, begin(2), 10, 11, acquired(3)),
		}, true},
		{"UnknownCompleteLandsOnce", []porcupine.Operation{
			op(0, begin(1), 0, 1, acquired(5)),
			op(0, complete(2, 1, "A"), 2, 100, unknown),
			op(1, begin(3), 10, 11, completedOut("A")),
			op(1, begin(4), 12, 13, problem(409, "in-progress")),
		}, false},
		{"KeysAreIndependent", []porcupine.Operation{
			op(0, begin(1), 0, 10, acquired(5)),
			op(1, Input{Kind: Begin, Key: "j", ID: 2, Fingerprint: "fp"}, 1, 9,
				Output{Status: 201, Key: "j", State: "in_progress", Fingerprint: "fp", Fence: 6, TokenShown: true}),
		}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := porcupine.CheckOperations(Model, tt.history); got != tt.want {
				t.Errorf("CheckOperations = %v, want %v", got, tt.want)
			}
		})
	}
}
