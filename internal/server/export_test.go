package server

// ReadErrorForTest is readError, for the tests of package server_test.
var ReadErrorForTest = readError
