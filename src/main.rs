//! The `voxtrald` binary: the command line in `voxtrald::cli`, over the counted system
//! allocator (so that `bench` can report allocations per frame).

#[global_allocator]
static HEAP: voxtrald::heap::Counted = voxtrald::heap::Counted;

fn main() -> std::process::ExitCode {
    voxtrald::cli::main()
}
