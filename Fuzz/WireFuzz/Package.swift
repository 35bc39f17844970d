// swift-tools-version:6.1
// The fuzz targets of the TCP frame decoder and message parser (WireFuzz) and of the NATS protocol parser
// (NATSFuzz). Built only by scripts/fuzz, with
// -sanitize=fuzzer,address (libFuzzer supplies `main`), so it lives outside the main package's build.
import PackageDescription

let package = Package(
    name: "WireFuzz",
    platforms: [.macOS(.v15)],
    // scripts/fuzz links .build-fuzz/herald to the repository, so the package is called "herald" wherever it is cloned.
    dependencies: [.package(path: "../../.build-fuzz/herald")],
    targets: [
        .executableTarget(
            name: "WireFuzz",
            dependencies: [.product(name: "HeraldWire", package: "herald")],
            swiftSettings: [.unsafeFlags(["-parse-as-library"])]
        ),
        .executableTarget(
            name: "NATSFuzz",
            dependencies: [.product(name: "HeraldNATS", package: "herald")],
            swiftSettings: [.unsafeFlags(["-parse-as-library"])]
        ),
    ]
)
