import Foundation

/// The directory of the test certificates made by scripts/gen-test-certs (a throwaway CA, server and client
/// certificates, and a second CA nobody trusts): scripts/test passes it in HERALD_TEST_CERTS; a test run alone
/// makes its own, once per process.
public let testCertificateDirectory: String = {
    if let given = ProcessInfo.processInfo.environment["HERALD_TEST_CERTS"] { return given }
    let directory = NSTemporaryDirectory() + "herald-certs-\(ProcessInfo.processInfo.processIdentifier)"
    let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("scripts/gen-test-certs").path
    let process = Process()
    process.executableURL = URL(fileURLWithPath: script)
    process.arguments = [directory]
    try? process.run()
    process.waitUntilExit()
    return directory
}()
