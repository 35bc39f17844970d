import Foundation
import HTTPTypes
import HeraldHTTP
import Testing

@Suite("OpenAPI document", .timeLimit(.minutes(2))) struct OpenAPITests {
    /// (method, path) pairs under `paths:` in docs/openapi.yaml: a path is a 2-space-indented key starting with
    /// `/`, its operations 4-space-indented HTTP methods.
    static func documented() throws -> Set<String> {
        let file = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("docs/openapi.yaml")
        let text = try String(contentsOf: file, encoding: .utf8)
        var inPaths = false
        var path: String?
        var operations = Set<String>()
        let methods: Set<String> = ["get", "put", "post", "delete", "patch", "head", "options"]
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            if !line.hasPrefix(" ") && !line.isEmpty {
                inPaths = line == "paths:"
                continue
            }
            guard inPaths else { continue }
            if line.hasPrefix("  /"), line.hasSuffix(":") {
                path = String(line.dropFirst(2).dropLast())
            } else if line.hasPrefix("    "), !line.hasPrefix("     "), let path {
                let key = line.trimmingCharacters(in: .whitespaces).split(separator: ":").first.map(String.init) ?? ""
                if methods.contains(key) { operations.insert("\(key.uppercased()) \(path)") }
            }
        }
        return operations
    }

    @Test func theDocumentDescribesExactlyTheServersRoutes() throws {
        let served = Set(APIRoute.allCases.map { "\($0.method.rawValue) \($0.path)" })
        let documented = try Self.documented()
        #expect(documented.count >= 10, "the document was parsed")
        #expect(served.subtracting(documented).isEmpty, "routes missing from docs/openapi.yaml")
        #expect(documented.subtracting(served).isEmpty, "documented routes the server does not have")
    }
}
